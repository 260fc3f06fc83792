"""Save and load adapter weights alone (safetensors) with a JSON adapter config.

File layout (``adapter_model.safetensors``), per adapted module ``M``:
    M.router.gate_weight (N x D), M.router.threshold_weight (1 x D), M.router.threshold_bias (1)
    M.experts.<global id>.lora_A (R x D), M.experts.<global id>.lora_B (O x R)   (moe/experts.py: expert_key)
    modules_to_save.<parameter name>   (task head trained in full)
Experts are keyed by global id so a file written under one expert-parallel layout loads
under any other. Under ZeRO-3, registered adapter parameters are gathered one module at a
time (never the whole model); all ranks must call ``adapter_state``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.adapters.peft_import import is_peft_config, ours_from_peft, peft_adapter_doc
from adamole_dist.adapters.targets import matches
from adamole_dist.atomic_files import write_dir_atomically
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.moe.experts import EXPERT_TENSORS, ExpertBank, expert_key, file_orientation
from adamole_dist.parallel import collectives

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def bank_tensors(prefix: str, bank: ExpertBank) -> dict[str, torch.Tensor]:
    out = {}
    for tensor in EXPERT_TENSORS:
        rows = getattr(bank, tensor)
        for i, gid in enumerate(bank.expert_ids):
            out[expert_key(prefix, gid, tensor)] = file_orientation(tensor, rows[i].detach()).cpu().contiguous()
    return out


def load_bank_tensors(prefix: str, bank: ExpertBank, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor in EXPERT_TENSORS:
            rows = getattr(bank, tensor)
            for i, gid in enumerate(bank.expert_ids):
                stored = _fitting(tensors, expert_key(prefix, gid, tensor), file_orientation(tensor, rows[i]).shape)
                rows[i].copy_(file_orientation(tensor, stored))


def head_parameters(adapters: Adapters) -> dict[str, nn.Parameter]:
    out = {}
    for name, module in adapters.model.named_modules():
        if any(matches(name, t) for t in adapters.trainable_modules):
            for pname, p in module.named_parameters(recurse=True):
                out[f"{name}.{pname}"] = p
    return out


def gather_experts(local: dict[str, torch.Tensor], ep_group) -> dict[str, torch.Tensor]:
    """Merge every EP rank's expert tensors (keyed by global id). Collective over the EP group."""
    parts = collectives.all_gather_objects(local, group=ep_group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def adapter_state(adapters: Adapters, *, ep_group=None, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """Every adapter tensor on CPU, under the file layout above. With expert parallelism pass the
    EP group: all experts are gathered (collective); otherwise only this rank's experts."""
    out: dict[str, torch.Tensor] = {}
    if ep_size > 1:
        local = {}
        for name, bank in adapters.expert_banks.items():
            local.update(bank_tensors(name, bank))
        out.update(gather_experts(local, ep_group))
    for name, layer in adapters.layers.items():
        if layer.router is not None:
            params = dict(layer.router.named_parameters())
            with gathered(list(params.values())):
                for pname, p in params.items():
                    out[f"{name}.router.{pname}"] = p.detach().cpu().clone()
            if layer.router.selection_bias is not None:
                out[f"{name}.router.selection_bias"] = layer.router.selection_bias.detach().cpu().clone()
            if ep_size == 1:
                out.update(bank_tensors(name, layer.experts))
        else:
            with gathered([layer.lora.lora_A, layer.lora.lora_B]):
                out.update(bank_tensors(name, layer.lora))
    for pname, p in head_parameters(adapters).items():
        with gathered([p]):
            out[f"modules_to_save.{pname}"] = p.detach().cpu().clone()
    return out


def load_adapter_state(adapters: Adapters, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors (file layout) into the adapters; every expected key must be present."""
    for name, layer in adapters.layers.items():
        if layer.router is not None:
            params = dict(layer.router.named_parameters())
            with gathered(list(params.values()), modifier_rank=0), torch.no_grad():
                for pname, p in params.items():
                    p.copy_(_fitting(tensors, f"{name}.router.{pname}", p.shape))
            if layer.router.selection_bias is not None:
                bias = layer.router.selection_bias
                bias.copy_(_fitting(tensors, f"{name}.router.selection_bias", bias.shape))
            _check_experts(tensors, name, layer.experts)
            load_bank_tensors(name, layer.experts, tensors)
        else:
            _check_experts(tensors, name, layer.lora)
            with gathered([layer.lora.lora_A, layer.lora.lora_B], modifier_rank=0):
                load_bank_tensors(name, layer.lora, tensors)
    for pname, p in head_parameters(adapters).items():
        with gathered([p], modifier_rank=0), torch.no_grad():
            p.copy_(_fitting(tensors, f"modules_to_save.{pname}", p.shape))


def _need(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise KeyError(f"adapter weights lack {key!r}")
    return tensors[key]


def _fitting(tensors: dict, key: str, shape) -> torch.Tensor:
    """The tensor under ``key``, which must have this model's ``shape``."""
    t = _need(tensors, key)
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, this model's is {tuple(shape)}")
    return t


def _check_experts(tensors: dict, name: str, bank: ExpertBank) -> None:
    for gid in bank.expert_ids:
        for tensor in EXPERT_TENSORS:
            _need(tensors, expert_key(name, gid, tensor))


def save_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: AdapterConfig, meta: dict) -> None:
    """Write weights and config (call on one rank, with ``adapter_state`` gathered on all)."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        doc = {"format_version": FORMAT_VERSION, "adapter": cfg.to_dict(), **meta}
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2))

    write_dir_atomically(Path(out_dir), write)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter directory's config document, the directory checked whole before any model loads:
    the config valid, the weights file present and its header intact (a write cut short no longer
    covers the sizes the header declares). ConfigError naming the file otherwise. A PEFT LoRA folder
    reads as a method lora adapter (peft_import.py; its document says "peft": true)."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ConfigError(f"adapter directory {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} not found: {folder} is not an adapter directory")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if is_peft_config(doc):  # a LoRA saved by peft (or TRL): read as a method lora adapter
        return peft_adapter_doc(folder, doc)
    if not isinstance(doc, dict) or not isinstance(doc.get("adapter"), dict):
        raise ConfigError(f"{path} holds no adapter configuration (an object under \"adapter\")")
    try:
        AdapterConfig.from_dict(doc["adapter"])
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"{weights} not found: the adapter directory has no weights")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights} cannot be read ({e}): damaged or incomplete") from None
    return doc


def load_adapter(model: nn.Module, adapter_dir: str | Path, **inject_kw) -> Adapters:
    """Inject the saved adapter into a fresh base model and load its weights."""
    doc = read_adapter_config(adapter_dir)
    cfg = AdapterConfig.from_dict(doc["adapter"])
    trained_on = doc.get("base_model_path") or doc.get("base_model") or "an unrecorded base model"
    try:
        adapters = inject_adapters(model, cfg, trainable_modules=doc.get("trainable_modules", []), **inject_kw)
        tensors = load_file(str(Path(adapter_dir) / WEIGHTS_NAME))
        load_adapter_state(adapters, ours_from_peft(tensors) if doc.get("peft") else tensors)
    except (ConfigError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"adapter {adapter_dir} does not fit this model: it was trained on {trained_on} "
                          f"({message})") from None
    return adapters
