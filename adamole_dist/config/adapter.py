"""Typed adapter configuration: which method, its hyperparameters, and validation.

Every field carries its help text (shown by ``launch/train.py --help``). ``validate()``
runs in ``__post_init__`` so a bad value fails before any model is loaded, with an error
that names the field and the offending number.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from adamole_dist.config.fields import ConfigError, check_choices, opt

METHODS = ("lora", "mole_topk", "mole_threshold", "sira", "adamole")
MOE_METHODS = ("mole_topk", "mole_threshold", "sira", "adamole")


@dataclass(kw_only=True)
class AdapterConfig:
    """Adapter method and hyperparameters; saved as adapter_config.json beside the weights."""

    method: str = opt("adamole", "adapter method", choices=METHODS)
    target_modules: list = opt(
        [],
        "modules to adapt (nn.Linear or GPT-2's Conv1D): names matched against the last name component or a "
        "dotted suffix (e.g. q_proj or attention.output.dense), or a shorthand: attention, mlp, all-linear (every "
        "linear layer of the blocks; never the LM head, a task head or a MoE base's routers); empty = the model "
        "type's default (its attention projections, adapters/targets.py)",
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
    drop_policy: str = opt("probs",
                           "which pairs an expert over capacity keeps: highest probability or earliest position",
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
    def has_tau(self) -> bool:
        """The router computes a per-token threshold tau (AdaMoLE)."""
        return self.method == "adamole"

    @property
    def uses_top_k(self) -> bool:
        """Each token takes its top_k experts (MoLE top-k, SiRA)."""
        return self.method in ("mole_topk", "sira")

    @property
    def has_gate_dropout(self) -> bool:
        """Dropout on the gate's logits while training (SiRA)."""
        return self.method == "sira"

    @property
    def expected_active_experts(self) -> float:
        """Active experts per token assumed before any routing is seen (placement model): top_k, or
        half the experts for threshold methods (the paper's AdaMoLE activates 3.5-4.6 of 8)."""
        return float(self.top_k) if self.uses_top_k else self.num_experts / 2

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
        return 1.0 if self.method == "sira" else 0.0  # SiRA caps expert load by design

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
        if self.uses_top_k:
            if not isinstance(self.top_k, int) or self.top_k <= 0:
                raise ConfigError(f"{p}top_k ({self.top_k}) must be a positive integer")
            if self.top_k > self.num_experts:
                raise ConfigError(f"{p}top_k ({self.top_k}) must be <= {p}num_experts ({self.num_experts})")
        cf = self.effective_capacity_factor
        if not math.isfinite(cf) or cf < 0:
            raise ConfigError(f"{p}capacity_factor ({cf}) must be >= 0 (0 = dropless)")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ConfigError(f"{p}gate_dropout ({self.gate_dropout}) must be in [0, 1)")
        if self.aux_loss_variant == "reference" and not self.has_tau:
            raise ConfigError(f"{p}aux_loss_variant 'reference' uses p - tau and needs method 'adamole', "
                              f"not {self.method!r}")
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
