"""The frozen base quantized when it loads (QLoRA): bitsandbytes 4-bit (nf4, fp4) or 8-bit (int8) linear
layers in place of the base's nn.Linear modules.

What is quantized: every nn.Linear of the loaded model (attention, MLP, an encoder's pooler), from
its loaded weights (a Hugging Face folder, a hub id, or a GGUF, which arrives dequantized to fp32).
What is not, the usual QLoRA choices: embeddings, norms and the LM head (the output embedding; SmolLM2
ties it to the input embedding) stay in the loaded dtype, and so does every module a run trains in
full (``keep``: a seq_cls task head, --trainable_modules). The adapters then wrap the quantized
layers (adapters/inject.py): ``base_layer(x)`` is bitsandbytes' dequantizing matmul.

bitsandbytes is an optional extra (``pip install 'adamole_dist[quantize]'``); it is imported only when
a base is quantized. The spec is recorded in the adapter (``adapter_meta``'s "quantization"), so
generation, evaluation and ``from_pretrained`` load the base quantized the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from adamole_dist.base_model.chunked_loss import output_embeddings
from adamole_dist.config.fields import ConfigError

SCHEMES = ("none", "nf4", "fp4", "int8")  # config.training.QUANTIZE_BASE
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZED_PARAMS = ("Params4bit", "Int8Params")  # bitsandbytes' weight types (not imported to check)


@dataclass(frozen=True)
class QuantSpec:
    """How the base's linear layers are quantized (see the module docstring)."""

    scheme: str = "none"
    double_quant: bool = True  # 4-bit: quantize the per-block scales too (~0.4 bit per weight less)
    compute_dtype: str = "fp32"  # 4-bit: the dtype the dequantized matmul runs in

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def to_record(self) -> dict | None:
        return dataclasses.asdict(self) if self.enabled else None

    @classmethod
    def from_record(cls, record: dict | None, origin: str = "adapter_config.json") -> QuantSpec:
        """The spec an adapter recorded (None: an unquantized base)."""
        if record is None:
            return cls()
        if not isinstance(record, dict) or record.get("scheme") not in SCHEMES:
            raise ConfigError(f"{origin}: quantization ({record!r}) must be an object with a scheme of "
                              f"{', '.join(SCHEMES)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def bitsandbytes_or_error(field: str = "quantize_base"):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"{field} needs bitsandbytes (pip install 'adamole_dist[quantize]'): {e}") from None
    return bitsandbytes


def is_quantized(linear: nn.Module) -> bool:
    return type(getattr(linear, "weight", None)).__name__ in QUANTIZED_PARAMS


def float_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype an adapter on ``linear`` computes in: the weight's, or a quantized layer's compute dtype."""
    if not is_quantized(linear):
        return getattr(linear, "weight").dtype
    dtype = getattr(linear, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _matches(name: str, keep: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep)


def quantize_base(model: nn.Module, spec: QuantSpec, keep: Sequence[str] = ()) -> list[str]:
    """Replace every nn.Linear of ``model`` but the output embedding and the modules named in ``keep``
    by its bitsandbytes layer, in place, on the weights' device; the names quantized."""
    if not spec.enabled:
        return []
    bnb = bitsandbytes_or_error()
    head = output_embeddings(model)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and not is_quantized(m) and not _matches(name, list(keep))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(bnb, linear, spec))
    return [name for name, _ in targets]


def _quantized(bnb, linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    w, device = linear.weight.data, linear.weight.device
    has_bias = linear.bias is not None
    if spec.scheme == "int8":
        # threshold 0: no outlier columns kept in fp16, every column int8 (one matmul path, CPU and GPU)
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w.float().contiguous(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                              compute_dtype=COMPUTE_DTYPES[spec.compute_dtype], compress_statistics=spec.double_quant,
                              quant_type=spec.scheme, device="meta")
        q.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, quant_type=spec.scheme,
                                     compress_statistics=spec.double_quant).to(device)
        # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel the first time an eval-mode
        # layer runs without gradients (only shapes its blocks divide); one layout for training and evaluation
        q.support_avx512bf16_for_cpu = False
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q.train(linear.training)
    return q


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's linear-layer weights as stored (quantized: codes plus their scales)."""
    total = 0
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight
        total += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        scb = getattr(m.state, "SCB", None) if hasattr(m, "state") else None
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    out = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return out + (_state_tensors(nested) if nested is not None else [])
