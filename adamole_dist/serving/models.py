"""The models a server answers for: the base alone and each adapter on it, the base's weights in memory once.

Each adapter gets a structural copy of the base model whose parameters and buffers ARE the base's tensors
(``shared_copy``: a deep copy told to keep every tensor), and the adapter is injected into that copy and
loaded (adapters/pretrained.py ``from_pretrained(dir, model=copy)``). The copy's adapted layers wrap the
base's own linear weights, so an adapter costs its own tensors and a few module objects, and the base alone
still runs unadapted. Every adapter must record the base being served (adapter_config.json's base model);
one trained on another base is refused at start, by name, before anything loads.

Only causal language-model adapters generate: a classification (seq_cls) adapter is refused too."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from adamole_dist.adapters.files import read_adapter_config
from adamole_dist.adapters.pretrained import base_model_of, from_pretrained, warn_if_other_base
from adamole_dist.base_model.model_loading import load_model_and_tokenizer, resolve_model_path
from adamole_dist.config.fields import ConfigError
from adamole_dist.generation.loading import DTYPES
from adamole_dist.generation.prompts import prompt_format_for
from adamole_dist.generation.stops import stop_ids


@dataclass
class ServedModel:
    """One name a request's ``model`` can pick: the network, its tokenizer, the adapter handle (None for the
    base), how its chat prompts render (the adapter's prompt format), the stop tokens, the padding id."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    adapters: object | None
    prompt_format: str
    stops: list[int]
    pad_id: int
    meta: dict | None = None  # the adapter config document

    @property
    def has_experts(self) -> bool:
        return self.adapters is not None and self.adapters.cfg.is_moe

    def card(self, base_name: str) -> dict:
        """Its entry in GET /v1/models (the extension fields under "adapter")."""
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "adamole_dist",
                 "root": base_name, "parent": None if self.adapters is None else base_name}
        if self.adapters is not None:
            cfg = self.adapters.cfg
            entry["adapter"] = {"method": cfg.method, "num_experts": cfg.num_experts, "rank": cfg.rank,
                                "prompt_format": self.prompt_format}
        return entry


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are ``model``'s own tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def same_base(doc: dict, adapter_dir: Path, base: str, base_path: str) -> bool:
    """Whether an adapter (its config ``doc``) was trained on the served base (given as ``base``, resolved to
    the folder ``base_path``): the same folder when its recorded one exists here, else the same name."""
    recorded = doc.get("base_model_path")
    if recorded and Path(recorded).exists() and Path(base_path).exists():
        return Path(recorded).resolve() == Path(base_path).resolve()
    return base_model_of(doc, adapter_dir) in (base, base_path)


def read_adapter_docs(adapters: dict[str, Path]) -> dict[str, dict]:
    """Each adapter's config, checked whole (ConfigError naming the adapter), before any model loads."""
    docs = {}
    for name, folder in adapters.items():
        try:
            docs[name] = read_adapter_config(folder)
        except ConfigError as e:
            raise ConfigError(f"--adapter {name}={folder}: {e}") from None
        task = docs[name].get("task_type", "causal_lm")
        if task not in ("causal_lm", "auto"):
            raise ConfigError(f"--adapter {name}={folder} is a {task} adapter: only causal_lm adapters generate")
    return docs


def check_bases(adapters: dict[str, Path], docs: dict[str, dict], base: str, base_path: str) -> None:
    """ConfigError naming every adapter trained on another base than the served one."""
    foreign = [f"{name}={adapters[name]} (trained on {base_model_of(doc, adapters[name])})"
               for name, doc in docs.items() if not same_base(doc, adapters[name], base, base_path)]
    if foreign:
        raise ConfigError(f"adapters of another base than the served {base}: {', '.join(foreign)}; "
                          "serve each base from a server of its own")


def served(name: str, model, tokenizer, adapters=None, meta: dict | None = None) -> ServedModel:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = prompt_format_for("auto", meta, tokenizer)
    return ServedModel(name, model, tokenizer, adapters, fmt, stop_ids(model, tokenizer), tokenizer.pad_token_id,
                       meta)


def load_served_models(base: str | None, adapters: dict[str, Path], base_name: str, device: str | None = None,
                       dtype: str = "float32") -> dict[str, ServedModel]:
    """name -> ServedModel: ``base_name`` for the base alone, then every adapter on it. ``base``: the base
    model (default: the one the first adapter records). ConfigError naming what does not fit."""
    docs = read_adapter_docs(adapters)
    if base is None:
        first = next(iter(adapters))
        base = base_model_of(docs[first], adapters[first])
    check_bases(adapters, docs, base, resolve_model_path(base))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _, _ = load_model_and_tokenizer(base, "causal_lm", dtype=DTYPES[dtype])
    model.requires_grad_(False)
    model.eval().to(device)
    models = {base_name: served(base_name, model, tokenizer)}
    for name, folder in adapters.items():
        warn_if_other_base(docs[name], folder, base)
        net, tok = from_pretrained(folder, model=shared_copy(model))
        net.adamole_adapters.context.collect_stats = False  # routing statistics: nobody reads them here
        models[name] = served(name, net, tok, net.adamole_adapters, docs[name])
    return models


def max_model_len(models: dict[str, ServedModel], requested: int | None) -> int:
    """Prompt + reply tokens a request may use: ``requested`` (--max_model_len), within the positions the base
    model has (its max_position_embeddings, also the default; 2048 when its config names none)."""
    limit = getattr(next(iter(models.values())).model.config, "max_position_embeddings", None)
    if requested is None:
        return limit or 2048
    if limit and requested > limit:
        raise ConfigError(f"--max_model_len ({requested}) exceeds the model's {limit} positions")
    return requested
