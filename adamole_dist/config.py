"""Typed adapter configuration: which method, its hyperparameters, and validation.

Every field carries its help text (shown by ``launch/train.py --help``). ``validate()``
runs in ``__post_init__`` so a bad value fails before any model is loaded, with an error
that names the field and the offending number.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "mole_topk", "mole_threshold", "sira", "adamole")
MOE_METHODS = ("mole_topk", "mole_threshold", "sira", "adamole")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def opt(default: Any, help: str, choices: tuple | None = None, aliases: dict | None = None, **kw) -> Any:
    """A dataclass field carrying its help text (and choices, and word aliases of values) for the CLI."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if aliases is not None:
        meta["aliases"] = aliases
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def check_choice(prefix: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{prefix}{name} ({value!r}) must be one of {', '.join(map(str, choices))}")


def check_choices(obj: Any, prefix: str) -> None:
    """Coerce and type-check every field, and validate those declared with ``choices``."""
    coerce_types(obj, prefix)
    for f in dataclasses.fields(obj):
        if "choices" in f.metadata:
            check_choice(prefix, f.name, getattr(obj, f.name), f.metadata["choices"])


def _coerce(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)  # accepts ints and YAML's "1e-3" strings
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return list(value)
    return value


def type_name(hint: Any) -> str:
    """'a number', 'a list (a,b,c)' ... for error messages (not "<class 'float'>")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        return f"{type_name(args[0])} or null"
    if hint is list or typing.get_origin(hint) is list:
        return "a list (comma-separated on the command line)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce_types(obj: Any, prefix: str) -> None:
    """Convert values given as text or ints (recipes, CLI) to the declared field types."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str) and value in f.metadata.get("aliases", {}):
            value = f.metadata["aliases"][value]
        try:
            setattr(obj, f.name, _coerce(value, hints[f.name]))
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}{f.name} ({value!r}) must be {type_name(hints[f.name])}") from None


@dataclass(kw_only=True)
class AdapterConfig:
    """Adapter method and hyperparameters; saved as adapter_config.json beside the weights."""

    method: str = opt("adamole", "adapter method", choices=METHODS)
    target_modules: list = opt(
        [],
        "names of the nn.Linear modules to adapt, matched against the last name component or a "
        "dotted suffix (e.g. q_proj or attention.output.dense); empty = the model family's default",
    )
    num_experts: int = opt(8, "number of LoRA experts N (lora uses exactly one)")
    rank: int = opt(4, "rank r of each LoRA expert (for lora: the LoRA rank; compare at rank N*r)")
    alpha: float = opt(16.0, "LoRA alpha; each expert's delta is scaled by alpha/rank")
    dropout: float = opt(0.05, "dropout on the expert input x (one mask shared by the experts)")
    tau_max: float | None = opt(None, "adamole: maximum threshold tau_max in (0, 1]; default 1/N")
    top_k: int = opt(2, "mole_topk and sira: experts per token")
    threshold: float | None = opt(None, "mole_threshold: fixed threshold on the softmax probabilities; default 1/N")
    capacity_factor: float | None = opt(
        None,
        "capacity per expert per step = ceil(cf * routed pairs / N) (routed pairs = tokens * mean "
        "active experts); 0 = dropless; default: 1.0 for sira, 0 otherwise",
    )
    drop_policy: str = opt("probs", "which pairs an expert over capacity keeps: highest probability or earliest position",
                           choices=("probs", "position"))
    renormalize_after_drop: bool = opt(False, "renormalise a token's surviving expert weights after capacity drops")
    gate_dropout: float = opt(0.1, "sira: dropout on the gate logits during training (SiRA's expert dropout)")
    aux_loss_coeff: float = opt(1e-3, "coefficient of the load-balancing loss added to the task loss")
    aux_loss_variant: str = opt(
        "switch", "switch: P_i = mean gate probability; reference: P_i = mean of p_i - tau (public AdaMoLE code)",
        choices=("switch", "reference"),
    )
    aux_loss_reduce: str = opt("sum", "how per-layer aux losses combine", choices=("sum", "mean"))
    aux_loss_scope: str = opt(
        "local", "f and P of the aux loss from this rank's tokens, or all-reduced over data parallel ranks",
        choices=("local", "global"))
    balance_bias_rate: float = opt(
        0.0, "aux-loss-free balancing (DeepSeek-V3 style): per-expert bias on the selection scores only, "
        "moved by this step size towards the mean global load after every optimizer step; 0 = off")
    route_padding: bool = opt(
        False, "route padding tokens (attention_mask 0) through the experts and into the aux loss, as the "
        "public AdaMoLE code does; by default they get a zero delta and are left out of all statistics")
    compute_path: str = opt(
        "auto", "expert compute: dense (masked, all experts), grouped (sorted pairs), auto (rule in experts.py)",
        choices=("auto", "dense", "grouped"),
    )

    def __post_init__(self) -> None:
        if self.method == "lora":
            self.num_experts = 1
        self.validate()

    # -- derived values -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.method in MOE_METHODS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def effective_tau_max(self) -> float:
        return self.tau_max if self.tau_max is not None else 1.0 / self.num_experts

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else 1.0 / self.num_experts

    @property
    def effective_capacity_factor(self) -> float:
        if self.capacity_factor is not None:
            return self.capacity_factor
        return 1.0 if self.method == "sira" else 0.0

    def validate(self, prefix: str = "adapter.") -> None:
        check_choices(self, prefix)
        p = prefix
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise ConfigError(f"{p}num_experts ({self.num_experts}) must be a positive integer")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"{p}rank ({self.rank}) must be a positive integer")
        if self.num_experts * self.rank <= 0:
            raise ConfigError(f"{p}num_experts * rank ({self.num_experts * self.rank}) must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{p}dropout ({self.dropout}) must be in [0, 1)")
        if self.tau_max is not None and not (0.0 < self.tau_max <= 1.0):
            raise ConfigError(f"{p}tau_max ({self.tau_max}) must be in (0, 1]")
        if self.threshold is not None and not (0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"{p}threshold ({self.threshold}) must be in [0, 1]")
        if self.method in ("mole_topk", "sira"):
            if not isinstance(self.top_k, int) or self.top_k <= 0:
                raise ConfigError(f"{p}top_k ({self.top_k}) must be a positive integer")
            if self.top_k > self.num_experts:
                raise ConfigError(f"{p}top_k ({self.top_k}) must be <= {p}num_experts ({self.num_experts})")
        cf = self.effective_capacity_factor
        if not math.isfinite(cf) or cf < 0:
            raise ConfigError(f"{p}capacity_factor ({cf}) must be >= 0 (0 = dropless)")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ConfigError(f"{p}gate_dropout ({self.gate_dropout}) must be in [0, 1)")
        if self.aux_loss_variant == "reference" and self.method != "adamole":
            raise ConfigError(f"{p}aux_loss_variant 'reference' uses p - tau and needs method 'adamole', not {self.method!r}")
        if self.balance_bias_rate < 0:
            raise ConfigError(f"{p}balance_bias_rate ({self.balance_bias_rate}) must be >= 0 (0 = off)")
        if self.aux_loss_coeff < 0:
            raise ConfigError(f"{p}aux_loss_coeff ({self.aux_loss_coeff}) must be >= 0")
        if not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"{p}target_modules ({self.target_modules!r}) must be non-empty strings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"adapter config has unknown fields: {', '.join(unknown)}")
        return cls(**data)
