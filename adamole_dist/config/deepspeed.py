"""DeepSpeed JSON config: read it, fill its "auto" values from the TrainConfig, reject conflicts.

The trainer owns batch sizes, the optimizer's hyperparameters and the lr schedule (the expert
optimizer must follow the same ones), so a JSON value that disagrees with them is an error
rather than a silent override.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

import torch

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig

DEFAULT_ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "bf16": {"enabled": "auto"},
}


def _fill(cfg: dict, key: str, value, flag: str, where: str) -> None:
    """``where``: 'ds_config (file) section.' for the message."""
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(f"{where}{key} ({current}) disagrees with {flag} ({value}); "
                          f"set it to \"auto\" or change {flag}")


FP16_STANCE = ("the experts train outside the DeepSpeed engine (docs/zero3_experts.md), where DeepSpeed's "
               "fp16 loss scaling does not reach them; use bf16 (\"bf16\": {\"enabled\": true}) or fp32")


def reject_fp16(ds: dict, source: str) -> None:
    """fp16 needs dynamic loss scaling; the expert optimizer would step on scaled (or, after an
    overflow the engine skipped, inf/NaN) gradients. bf16 needs no loss scale."""
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise ConfigError(f"ds_config ({source}) fp16.enabled: fp16 is not supported: {FP16_STANCE}")
    amp = ds.get("amp")
    if isinstance(amp, dict) and amp.get("enabled") is True:
        raise ConfigError(f"ds_config ({source}) amp.enabled: apex AMP (fp16) is not supported: {FP16_STANCE}")
    autocast = ds.get("torch_autocast")
    if isinstance(autocast, dict) and autocast.get("enabled") is True and \
            str(autocast.get("dtype", "")).replace("torch.", "") in ("float16", "half", "fp16"):
        raise ConfigError(f"ds_config ({source}) torch_autocast.dtype ({autocast.get('dtype')}): fp16 autocast is "
                          f"not supported: {FP16_STANCE}")


def read_ds_config(path: str) -> dict:
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config ({path}) is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"ds_config ({path}) cannot be read: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config ({path}) must be a JSON object, not a {type(ds).__name__}")
    return ds


def ds_config_source(cfg: TrainConfig) -> str:
    """How error messages name the DeepSpeed config."""
    return cfg.ds_config or "the default ZeRO-3 config"


def build_ds_config(cfg: TrainConfig, world_size: int, base: dict | None = None) -> dict:
    """cfg.ds_config (or the default ZeRO-3 config; ``base``: these sections instead, a benchmark's own)
    with its "auto" values and the keys it leaves out filled from ``cfg``; a value that disagrees with
    ``cfg`` is a ConfigError."""
    source = ds_config_source(cfg) if base is None else "the caller's config"
    ds = copy.deepcopy(base) if base is not None else read_ds_config(cfg.ds_config) if cfg.ds_config else \
        copy.deepcopy(DEFAULT_ZERO3)
    top = f"ds_config ({source}) "
    reject_fp16(ds, source)
    if "scheduler" in ds:
        raise ConfigError(f"{top}has a 'scheduler': the trainer owns the lr schedule "
                          "(--lr_scheduler, --warmup_steps); remove it")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "--micro_batch_size", top)
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "--gradient_accumulation_steps", top)
    _fill(ds, "train_batch_size", cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
          "micro_batch_size * gradient_accumulation_steps * world size", top)
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "--max_grad_norm", top)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        shown = opt.get("type") if isinstance(opt, dict) else opt
        raise ConfigError(f"{top}optimizer.type ({shown}) must be AdamW: the expert optimizer mirrors it")
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.lr, "--lr", f"{top}optimizer.params.")
    _fill(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], "--adam_beta1/--adam_beta2", f"{top}optimizer.params.")
    _fill(params, "eps", cfg.adam_eps, "--adam_eps", f"{top}optimizer.params.")
    _fill(params, "weight_decay", cfg.weight_decay, "--weight_decay", f"{top}optimizer.params.")
    if not torch.cuda.is_available():
        params.setdefault("torch_adam", True)  # no fused CUDA kernel on the CPU accelerator
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    for key, auto_value in (("bf16", cuda_bf16), ("fp16", False)):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = auto_value
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class _KeysRead(dict):
    """A dict that remembers which keys were looked up (to find the top-level keys DeepSpeed ignores)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def _model_fields(title: str) -> list[str]:
    """Field names of the DeepSpeed config model called ``title`` (for 'did you mean')."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:  # names and their aliases (DeepSpeed's JSON keys are often the aliases)
            return list(cls.model_fields) + [f.alias for f in cls.model_fields.values() if f.alias]
        todo.extend(cls.__subclasses__())
    return []


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_of(ds: dict, key) -> str:
    """'zero_optimization.' when ``key`` sits in that top-level section, else ''."""
    for name, value in ds.items():
        if isinstance(value, dict) and key in value:
            return f"{name}."
    return ""


def validate_with_deepspeed(ds: dict, source: str) -> None:
    """Parse ``ds`` with DeepSpeed's own config model, as deepspeed.initialize will (needs the process
    group for the world size): nested typos, wrong types and batch-size conflicts become a
    ConfigError naming the key, and so does a top-level key DeepSpeed would silently ignore."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    where = f"ds_config ({source})"
    recorded = _KeysRead(copy.deepcopy(ds))
    try:
        DeepSpeedConfig(recorded)
    except ValidationError as e:
        err = e.errors()[0]
        key = err["loc"][0] if err["loc"] else "?"
        path = _section_of(ds, key) + ".".join(map(str, err["loc"]))
        hint = _did_you_mean(key, _model_fields(e.title)) if err["type"] == "extra_forbidden" else ""
        raise ConfigError(f"{where} {path}: {err['msg'].lower()}{hint}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: rejected by DeepSpeed: {str(e).strip() or type(e).__name__}") from None
    unknown = sorted(k for k in ds if k not in recorded.read)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{_did_you_mean(unknown[0], recorded.read)}; DeepSpeed "
                          "would ignore it")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
