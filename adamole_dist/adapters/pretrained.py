"""The public loader: a trained adapter directory -> a plain transformers model with the adapters in
it, and its tokenizer, for inference (``adamole_dist.from_pretrained``).

No process group and no DeepSpeed: every expert runs in this process (LocalDispatcher). Adapter
files key experts by global id, so an adapter trained under any ``ep_size`` loads the same way.
Unlike training, the expert banks are registered in the module tree (Adapters.register_experts):
``model.to("cuda")``, ``.half()``, ``.eval()`` and ``state_dict()`` include them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from adamole_dist.adapters.files import CONFIG_NAME, load_adapter, read_adapter_config
from adamole_dist.base_model.attention import check_attn_implementation
from adamole_dist.base_model.fingerprint import VERSION as FINGERPRINT_VERSION
from adamole_dist.base_model.fingerprint import fingerprint_of
from adamole_dist.base_model.model_loading import available_here, load_model_and_tokenizer, resolve_model_path
from adamole_dist.base_model.quantize import QuantSpec
from adamole_dist.config.fields import ConfigError

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def base_model_of(doc: dict, adapter_dir: Path) -> str:
    """Where the base model recorded in the adapter config is, tried in order: the name training was given
    (a hub id, a GGUF file or package, a folder) when it loads here without a download, then the folder it
    resolved to when that still exists, else the name (for the hub to fetch, or for the loader to name what
    is missing). An explicit ``model``/``--model`` is not asked for: it wins over both."""
    name, path = doc.get("base_model"), doc.get("base_model_path")
    if name and available_here(str(name)):
        return str(name)
    if path and Path(path).exists():
        return str(path)
    if not (name or path):
        raise ConfigError(f"{adapter_dir / CONFIG_NAME} records no base model; pass model=")
    return str(name or path)


def base_to_load(doc: dict, adapter_dir: Path | None, model: str | Path | None) -> str:
    """The base to load an adapter on: ``model`` when given (an explicit choice wins), else the recorded one
    (base_model_of); warned about when its content differs from the recorded base's."""
    source = str(model) if model is not None else base_model_of(doc, Path(str(adapter_dir)))
    if adapter_dir is not None:
        warn_if_other_base(doc, Path(adapter_dir), source)
    return source


def warn_if_other_base(doc: dict, adapter_dir: Path, source: str) -> None:
    """A warning naming both when the base ``source`` resolves to here holds other weights than the one the
    adapter recorded (base_model/fingerprint.py: a content hash); silent when either side has no hash."""
    recorded = doc.get("base_model_fingerprint")
    if not isinstance(recorded, str) or not recorded.startswith(f"{FINGERPRINT_VERSION}:"):
        return
    folder = resolve_model_path(source)
    found = fingerprint_of(folder)
    if found is not None and found != recorded:
        log.warning(f"the base model {source} ({folder}, content hash {found}) is not the one the adapter "
                    f"{adapter_dir} was trained on ({doc.get('base_model')}, then at {doc.get('base_model_path')}, "
                    f"content hash {recorded}); its outputs may differ from training's")


def _tokenizer_for(model: nn.Module, adapter_dir: Path, doc: dict):
    """The tokenizer beside a caller-supplied model: one saved in the adapter directory, else the
    recorded base model's, else the model's own name_or_path."""
    from transformers import AutoTokenizer

    candidates = []
    if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES):
        candidates.append(str(adapter_dir))
    for source in (doc.get("base_model_path"), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if source and Path(source).exists():
            candidates.append(str(source))
    if not candidates:
        raise ConfigError(f"no tokenizer found for {adapter_dir}: none saved beside the adapter, and the base "
                          "model's folder is not on this machine")
    tokenizer = AutoTokenizer.from_pretrained(candidates[0])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_kernel(name: str, device: str | torch.device | None) -> str | None:
    """``name`` checked for generation and evaluation (forward only) on ``device``: what the loader takes."""
    device_type = torch.device(device).type if device is not None else "cpu"
    return check_attn_implementation(name, device_type, training=False)


def recorded_quantization(doc: dict) -> dict:
    """load_model_and_tokenizer's arguments for the base as the adapter was trained on it: quantized the
    same way (base_model/quantize.py), the modules trained in full left unquantized."""
    return {"quantization": QuantSpec.from_record(doc.get("quantization")), "keep": doc.get("trainable_modules") or []}


def from_pretrained(adapter_dir: str | Path, *, model: str | Path | nn.Module | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    attn_implementation: str | None = None):
    """(model, tokenizer): the base model with the adapter of ``adapter_dir`` injected and loaded,
    in eval mode, every parameter frozen, the experts registered in the module tree.

    ``model``: the base model recorded in the adapter config by default (base_model_of: the name as given,
    then the resolved folder); a path (or name) to load instead, or an already loaded instance (the adapter
    is injected into it, in place). A loaded base whose content hash differs from the recorded one is
    warned about, naming both (warn_if_other_base).
    ``dtype``: the base model's dtype (default float32); the adapter follows it. ``device``: where
    to move the whole model. ``attn_implementation``: the attention kernel the base loads with (default:
    the one training recorded; base_model/attention.py checks it). The ``Adapters`` handle is
    ``model.adamole_adapters`` (routing statistics: ``model.adamole_adapters.context.pop_stats()``).
    Where training rendered prompts with its own chat template (adapter meta "chat_template"), the
    tokenizer gets it. ``adapter_dir`` may be a PEFT LoRA folder (adapters/peft_import.py): a method lora
    adapter on the base its config names.
    Bad input (missing directory, no or unreadable adapter_config.json, a base model the adapter
    does not fit): ConfigError naming the path.
    """
    folder = Path(adapter_dir)
    doc = read_adapter_config(folder)
    if isinstance(model, nn.Module):
        net = model
        if dtype is not None:
            net.to(dtype)
        tokenizer = _tokenizer_for(net, folder, doc)
    else:
        source = base_to_load(doc, folder, model)
        kernel = attention_kernel(attn_implementation or doc.get("attn_implementation") or "auto", device)
        net, tokenizer, _, _ = load_model_and_tokenizer(source, doc.get("task_type", "auto"),
                                                        dtype=dtype or torch.float32,
                                                        pooling=doc.get("pooling", "cls"), attn_implementation=kernel,
                                                        **recorded_quantization(doc))
    net.eval()  # before injection: new adapter modules follow the model's mode (no dropout)
    adapters = load_adapter(net, folder)  # LocalDispatcher, all experts (files key them by global id)
    adapters.register_experts()
    net.requires_grad_(False)
    net.eval()
    if device is not None:
        net.to(device)
    net.adamole_adapters = adapters
    template = doc.get("chat_template")
    if template:
        tokenizer.chat_template = template
    return net, tokenizer
