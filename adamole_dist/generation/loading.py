"""The model generation runs on: an adapter directory loaded onto its base (adapters/pretrained.py: every
expert in this process, registered in the module tree), or a base model alone; in eval mode, on one
device. No process group, no DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import torch

from adamole_dist.adapters.pretrained import attention_kernel, from_pretrained
from adamole_dist.base_model.model_loading import load_model_and_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_generation(adapter: Path | None, model: str | None, device: str | None = None,
                        dtype: str = "float32", attn_implementation: str | None = None):
    """(model, tokenizer, the Adapters handle or None): ``adapter`` onto its recorded base (or ``model``),
    else ``model`` alone as a causal LM. ``device``: default cuda when available, else cpu.
    ``attn_implementation``: default the adapter's (as trained), else transformers' choice."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter is not None:
        net, tokenizer = from_pretrained(adapter, model=model, device=device, dtype=DTYPES[dtype],
                                         attn_implementation=attn_implementation)
        return net, tokenizer, net.adamole_adapters
    net, tokenizer, _, _ = load_model_and_tokenizer(model, "causal_lm", dtype=DTYPES[dtype],
                                                    attn_implementation=attention_kernel(attn_implementation
                                                                                         or "auto", device))
    return net.eval().to(device), tokenizer, None
