"""Adapter directories for loader and generation tests: a tiny Llama folder (tests/helpers/tiny_models.py)
with an adapter injected, its weights randomised (a fresh adapter's lora_B is zero, so it would
change nothing), and saved as training saves it (files.save_adapter); and an adapter trained on an
encoder (seq_cls), which scores choices and cannot generate."""

from __future__ import annotations

from pathlib import Path

import torch

from adamole_dist.adapters.files import adapter_state, save_adapter
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.adapter import AdapterConfig

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def randomize_adapters(adapters, seed: int = 0, std: float = 0.5) -> None:
    """Every adapter parameter (routers, experts, the lora) drawn at random: routing that differs
    per token and deltas that move the logits."""
    g = torch.Generator().manual_seed(seed)
    params = [p for layer in adapters.layers.values() for p in layer.parameters() if p.requires_grad]
    params += adapters.expert_parameters()
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def write_adapter_dir(folder: Path, base_dir: Path, method: str, *, seed: int = 0, std: float = 0.1,
                      meta: dict | None = None, **cfg_kw) -> Path:
    """An adapter of ``method`` on the model in ``base_dir``, saved to ``folder``; returns folder.
    (At std 0.5 the deltas blow the hidden states up until fp32 cached and uncached attention differ
    by ~4e-5; 0.1 keeps the model in a realistic range and still moves its logits.)"""
    model, _, _, path = load_model_and_tokenizer(str(base_dir), "causal_lm")
    cfg = AdapterConfig(method=method, dropout=0.0, **cfg_kw)
    adapters = inject_adapters(model, cfg)
    randomize_adapters(adapters, seed, std)
    doc = {"base_model": str(base_dir), "base_model_path": path, "task_type": "causal_lm", "pooling": "cls",
           "trainable_modules": [], "step": 0, **(meta or {})}
    save_adapter(folder, adapter_state(adapters), cfg, doc)
    return Path(folder)


def seq_cls_adapter(root: Path) -> Path:
    """An adapter trained on an encoder (MiniLM-like BERT): it scores choices, it cannot generate."""
    from tests.helpers.tiny_models import write_tiny_bert

    bert = write_tiny_bert(root / "bert")
    model, *_ = load_model_and_tokenizer(str(bert), "seq_cls")
    adapters = inject_adapters(model, AdapterConfig(num_experts=2, rank=2), trainable_modules=["classifier"])
    save_adapter(root / "bert_adapter", adapter_state(adapters), adapters.cfg,
                 {"base_model": str(bert), "base_model_path": str(bert), "task_type": "seq_cls",
                  "trainable_modules": ["classifier"]})
    return root / "bert_adapter"
