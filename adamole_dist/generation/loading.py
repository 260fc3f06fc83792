"""The model generation runs on: an adapter directory loaded onto its base (adapters/pretrained.py: every
expert in this process, registered in the module tree), or a base model alone; in eval mode, on one
device. No process group, no DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import torch

from adamole_dist.adapters.pretrained import attention_kernel, from_pretrained
from adamole_dist.base_model.model_loading import load_model_and_tokenizer, resolve_model_path, resolve_task_type
from adamole_dist.config.fields import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None) -> str:
    """``name`` (default: cuda when available, else cpu) checked: ConfigError for one torch does not know
    or that this machine lacks, before the model loads."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device ({name!r}) is not a device torch knows: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device ({name}): this machine has no CUDA GPU; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device ({name}): this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name


def check_generates(adapter_doc: dict | None, adapter: Path | None, model: str | None) -> None:
    """ConfigError unless the model generates text (a causal LM): the adapter's recorded task type, else
    the base model's architecture. An encoder (MiniLM) scores choices; it has no generation head."""
    if adapter_doc is not None:
        task_type, what = adapter_doc.get("task_type", "causal_lm"), f"--adapter {adapter} was trained on"
    else:
        task_type, what = resolve_task_type("auto", resolve_model_path(str(model))), f"--model {model} is"
    if task_type != "causal_lm":
        raise ConfigError(f"{what} an encoder ({task_type}: it scores choices, it has no generation head); "
                          "generation needs a decoder (causal_lm), e.g. an adapter trained on smollm2-135m")


def load_for_generation(adapter: Path | None, model: str | None, device: str | None = None,
                        dtype: str = "float32", attn_implementation: str | None = None):
    """(model, tokenizer, the Adapters handle or None): ``adapter`` onto its recorded base (or ``model``),
    else ``model`` alone as a causal LM. ``device``: default cuda when available, else cpu.
    ``attn_implementation``: default the adapter's (as trained), else transformers' choice."""
    device = resolve_device(device)
    if adapter is not None:
        net, tokenizer = from_pretrained(adapter, model=model, device=device, dtype=DTYPES[dtype],
                                         attn_implementation=attn_implementation)
        return net, tokenizer, net.adamole_adapters
    net, tokenizer, _, _ = load_model_and_tokenizer(model, "causal_lm", dtype=DTYPES[dtype],
                                                    attn_implementation=attention_kernel(attn_implementation
                                                                                         or "auto", device))
    return net.eval().to(device), tokenizer, None
