"""A PEFT LoRA folder (``adapter_config.json`` with ``"peft_type": "LORA"``, ``adapter_model.safetensors``)
read as a ``--method lora`` adapter of ours: the inverse of export.py's PEFT form, so a LoRA trained with
peft or TRL loads through from_pretrained, generate.py and the server, and starts a training run
(peft_init.py).

PEFT saves ``base_model.model.<module>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r), the
adapter name left out, and a modules_to_save head under its plain parameter name. Its scaling is
lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); ours is alpha / rank, so rsLoRA becomes alpha =
lora_alpha * sqrt(r). The adapted modules are the ones the weights hold (their full names, which our
matching takes exactly), not PEFT's target_modules, which may be a regex or "all-linear".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.moe.experts import expert_key

PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)
PEFT_WEIGHTS = "adapter_model.safetensors"
TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# LoraConfig fields whose non-default values change the maths: refused rather than loaded wrongly.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}


def is_peft_config(doc) -> bool:
    return isinstance(doc, dict) and "peft_type" in doc and "adapter" not in doc


def weight_keys(folder: Path) -> list[str]:
    """The tensor names of the folder's PEFT weights (the header only); ConfigError naming the file."""
    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        found = " (adapter_model.bin: re-save it with safe_serialization=True)" if (folder / "adapter_model.bin"
                                                                                   ).is_file() else ""
        raise ConfigError(f"{path} not found: the PEFT LoRA folder {folder} has no safetensors weights{found}")
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors' own error type, or an OSError
        raise ConfigError(f"{path} cannot be read ({e}): damaged or incomplete") from None


def lora_modules(keys: list[str]) -> list[str]:
    """The adapted module names: those with a lora_A weight under PEFT's prefix."""
    return sorted(k[len(PEFT_PREFIX): -len(LORA_SUFFIXES[0])] for k in keys
                  if k.startswith(PEFT_PREFIX) and k.endswith(LORA_SUFFIXES[0]))


def peft_adapter_doc(folder: Path, peft: dict) -> dict:
    """Our adapter config document for the PEFT LoRA folder ``folder`` (its config ``peft``): method lora,
    the base as PEFT names it, prompts rendered as the base renders them ("auto"). ConfigError naming the
    field PEFT uses that we cannot load."""
    where = folder / "adapter_config.json"
    if peft.get("peft_type") != "LORA":
        raise ConfigError(f"{where} is a PEFT {peft.get('peft_type')} adapter; only PEFT LoRA (peft_type LORA) loads")
    for field, plain in UNSUPPORTED.items():
        if peft.get(field, plain) not in (plain, None):
            raise ConfigError(f"{where}: {field} ({peft[field]!r}) is not supported (only {plain!r} loads as a LoRA)")
    r, lora_alpha = peft.get("r"), peft.get("lora_alpha", 8)
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{where}: r ({r!r}) must be a positive integer")
    keys = weight_keys(folder)
    modules = lora_modules(keys)
    if not modules:
        raise ConfigError(f"{folder / PEFT_WEIGHTS} holds no LoRA weights ({PEFT_PREFIX}<module>.lora_A.weight)")
    alpha = lora_alpha * math.sqrt(r) if peft.get("use_rslora") else lora_alpha
    cfg = AdapterConfig(method="lora", rank=r, alpha=float(alpha), dropout=float(peft.get("lora_dropout") or 0.0),
                        target_modules=modules)
    heads = [k[len(PEFT_PREFIX):] for k in keys if k.startswith(PEFT_PREFIX) and not k.endswith(LORA_SUFFIXES)]
    return {"format_version": 1, "adapter": cfg.to_dict(), "peft": True,
            "base_model": peft.get("base_model_name_or_path"),
            "task_type": TASK_TYPES.get(peft.get("task_type") or "CAUSAL_LM", "causal_lm"),
            "trainable_modules": sorted({h.rpartition(".")[0] for h in heads}), "prompt_format": "auto"}


def lora_factors(peft_tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A r x in, B out x r)} of PEFT's saved tensors."""
    out = {}
    for module in lora_modules(list(peft_tensors)):
        stem = f"{PEFT_PREFIX}{module}"
        out[module] = (peft_tensors[stem + LORA_SUFFIXES[0]], peft_tensors[stem + LORA_SUFFIXES[1]])
    return out


def ours_from_peft(peft_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved tensors under our file layout (files.py): each LoRA as expert 0, heads under
    ``modules_to_save.``."""
    out = {}
    for module, (A_RD, B_OR) in lora_factors(peft_tensors).items():
        out[expert_key(module, 0, "lora_A")], out[expert_key(module, 0, "lora_B")] = A_RD, B_OR
    for key, t in peft_tensors.items():
        if key.startswith(PEFT_PREFIX) and not key.endswith(LORA_SUFFIXES):
            out[f"modules_to_save.{key[len(PEFT_PREFIX):]}"] = t
    return out
