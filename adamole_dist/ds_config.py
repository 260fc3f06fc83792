"""DeepSpeed JSON config: read it, fill its "auto" values from the TrainConfig, reject conflicts.

The trainer owns batch sizes, the optimizer's hyperparameters and the lr schedule (the expert
optimizer must follow the same ones), so a JSON value that disagrees with them is an error
rather than a silent override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .config import ConfigError
from .train_config import TrainConfig

DEFAULT_ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "bf16": {"enabled": "auto"},
}


def _fill(cfg: dict, key: str, value, flag: str, path: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(f"ds_config {path}{key} ({current}) disagrees with {flag} ({value}); "
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


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    if cfg.ds_config:
        try:
            ds = json.loads(Path(cfg.ds_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"ds_config ({cfg.ds_config}) is not valid JSON: {e}") from None
    else:
        ds = copy.deepcopy(DEFAULT_ZERO3)
    reject_fp16(ds, cfg.ds_config or "default")
    if "scheduler" in ds:
        raise ConfigError(f"ds_config ({cfg.ds_config}) has a 'scheduler': the trainer owns the lr schedule "
                          "(--lr_scheduler, --warmup_steps); remove it")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "--micro_batch_size", "")
    _fill(ds, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, "--gradient_accumulation_steps", "")
    _fill(ds, "train_batch_size", cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
          "micro_batch_size * gradient_accumulation_steps * world size", "")
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "--max_grad_norm", "")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"ds_config optimizer.type ({opt.get('type')}) must be AdamW: the expert optimizer mirrors it")
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.lr, "--lr", "optimizer.params.")
    _fill(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], "--adam_beta1/--adam_beta2", "optimizer.params.")
    _fill(params, "eps", cfg.adam_eps, "--adam_eps", "optimizer.params.")
    _fill(params, "weight_decay", cfg.weight_decay, "--weight_decay", "optimizer.params.")
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


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
