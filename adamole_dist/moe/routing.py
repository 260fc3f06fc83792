"""Routers: from a token's hidden state to per-expert weights. Pure maths, no communication.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Every router returns a :class:`Routing` whose ``scores_TN`` is the non-negative quantity that
weights are renormalised over (p - tau for adamole, p for the others) and whose ``mask_TN``
marks the selected (token, expert) pairs. ``weights_TN = renormalize(scores_TN, mask_TN)``;
capacity drops (capacity.py) shrink the mask and either renormalise again or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.moe.fused_routing import FusedRouting


@dataclass
class Routing:
    probs_TN: torch.Tensor  # softmax gate probabilities (fp32)
    scores_TN: torch.Tensor  # quantity renormalised over for selected experts (fp32, >= 0 where selected)
    mask_TN: torch.Tensor  # bool: selected pairs
    weights_TN: torch.Tensor  # fp32 combine weights, 0 where not selected
    tau_T: torch.Tensor | None = None  # adamole threshold per token


def renormalize(scores_TN: torch.Tensor, mask_TN: torch.Tensor) -> torch.Tensor:
    """w_i = s_i / sum_{j in S} s_j over the selected set S; a row summing to 0 gives all-zero weights."""
    kept_TN = scores_TN * mask_TN
    denom_T1 = kept_TN.sum(dim=-1, keepdim=True)
    # Dividing by 1 where the sum is 0 keeps the gradient finite; the numerators are then all 0.
    safe_T1 = torch.where(denom_T1 > 0, denom_T1, torch.ones_like(denom_T1))
    return kept_TN / safe_T1


# ``bias_N`` (aux-loss-free balancing) shifts only which experts are selected, never the weights.


def adamole_select(probs_TN: torch.Tensor, tau_T: torch.Tensor, bias_N: torch.Tensor | None = None):
    """AdaMoLE: a_i = p_i - tau, selected where a_i >= 0. Returns (scores, mask)."""
    scores_TN = probs_TN - tau_T.unsqueeze(-1)
    if bias_N is None:
        return scores_TN, scores_TN >= 0
    # A bias can select an expert with p_i < tau; it then fires with weight 0.
    return scores_TN.clamp(min=0), scores_TN + bias_N >= 0


def topk_select(probs_TN: torch.Tensor, k: int, bias_N: torch.Tensor | None = None):
    """MoLE top-k: the k largest probabilities, renormalised over themselves."""
    key_TN = probs_TN if bias_N is None else probs_TN + bias_N
    top_idx_TE = key_TN.topk(k, dim=-1).indices
    mask_TN = torch.zeros_like(probs_TN, dtype=torch.bool).scatter_(-1, top_idx_TE, True)
    return probs_TN, mask_TN


def threshold_select(probs_TN: torch.Tensor, threshold: float, bias_N: torch.Tensor | None = None):
    """MoLE fixed threshold: experts with p_i >= threshold; none selected -> zero delta."""
    key_TN = probs_TN if bias_N is None else probs_TN + bias_N
    return probs_TN, key_TN >= threshold


def kaiming_linear_init_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """nn.Linear's default initialisation, for parameters held outside an nn.Linear."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


class Router(nn.Module):
    """Softmax gate W_g (N x D, no bias) plus a method-specific selection rule.

    The router owns its parameters directly (not through child nn.Linear modules) so that
    one module call gathers all of them under ZeRO-3.
    """

    selection_bias: torch.Tensor | None  # buffers (balance_bias_rate > 0), typed for the checker
    routed_load: torch.Tensor

    def __init__(self, cfg: AdapterConfig, in_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate_weight = nn.Parameter(torch.empty(cfg.num_experts, in_features, device=device, dtype=dtype))
        kaiming_linear_init_(self.gate_weight)
        if cfg.balance_bias_rate > 0:
            self.register_buffer("selection_bias", torch.zeros(cfg.num_experts, device=device))
            self.register_buffer("routed_load", torch.zeros(cfg.num_experts, device=device), persistent=False)
        else:
            self.selection_bias = None

    @torch.no_grad()
    def update_bias(self, global_load_N: torch.Tensor) -> None:
        """Aux-loss-free balancing: move each expert's bias towards the mean load by the rate."""
        assert self.selection_bias is not None, "update_bias needs balance_bias_rate > 0"
        self.selection_bias += self.cfg.balance_bias_rate * torch.sign(global_load_N.mean() - global_load_N)
        self.routed_load.zero_()

    def logits(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gate logits (fp32) and, for routers that have one, the threshold pre-activation."""
        return F.linear(x_TD, self.gate_weight).float(), None

    def read_rows(self) -> list[torch.Tensor]:
        """The weight rows x is multiplied by: the gate's (adamole: then the threshold network's)."""
        return [self.gate_weight]

    def threshold_bias_or_none(self) -> torch.Tensor | None:
        return None

    def fused_logits(self, x_TD: torch.Tensor, a_rows: torch.Tensor | None = None):
        """What the fused node takes: the logits (adamole: with the threshold logit, without its bias, as a
        last column) and the threshold bias (None without a threshold); then, with ``a_rows`` (the experts'
        A as K rows, when they read the same x), x's projection by them (T x K) from the same matmul --
        x, the big operand, is read once forward and its gradient written once backward -- else None."""
        rows = self.read_rows()
        if a_rows is not None:
            rows = [a_rows, *rows]
        both_TM = F.linear(x_TD, rows[0] if len(rows) == 1 else torch.cat(rows, dim=0))
        K = 0 if a_rows is None else a_rows.shape[0]
        bias = self.threshold_bias_or_none()
        return both_TM[:, K:].float(), None if bias is None else bias.float(), both_TM[:, :K] if K else None

    def select(self, probs_TN: torch.Tensor, extra_T: torch.Tensor | None) -> Routing:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, fused: tuple | None = None):
        """(probs_TN, threshold pre-activation or None). Tensors only, so ZeRO-3's hooks see them;
        ``route`` applies the selection rule. ``fused`` = (RoutingRule, valid_T, count_T, a_rows or None): the
        whole routing in one autograd node instead (fused_routing.py), inside this call, where ZeRO-3 has
        gathered the parameters: (weights_TN, aux or None, mask_TN, statistics sums, x's projection by
        a_rows or None)."""
        if fused is not None:
            rule, valid_T, count_T, a_rows = fused
            logits_TM, bias, h_TK = self.fused_logits(x_TD, a_rows)
            return *FusedRouting.apply(logits_TM, bias, valid_T, count_T, rule), h_TK
        logits_TN, extra_T = self.logits(x_TD)
        if self.cfg.has_gate_dropout and self.training and self.cfg.gate_dropout > 0:
            logits_TN = F.dropout(logits_TN, p=self.cfg.gate_dropout)
        return logits_TN.softmax(dim=-1), extra_T

    def route(self, x_TD: torch.Tensor) -> Routing:
        """Module call (gathers parameters under ZeRO-3), then the method's selection rule."""
        return self.select(*self(x_TD))


class AdaMoLERouter(Router):
    """tau = tau_max * sigmoid(W_tau x + b_tau); experts with p_i - tau >= 0 fire."""

    def __init__(self, cfg: AdapterConfig, in_features: int, *, device=None, dtype=None) -> None:
        super().__init__(cfg, in_features, device=device, dtype=dtype)
        self.tau_max = cfg.effective_tau_max
        self.threshold_weight = nn.Parameter(torch.empty(1, in_features, device=device, dtype=dtype))
        self.threshold_bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        kaiming_linear_init_(self.threshold_weight, self.threshold_bias)

    def logits(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One matmul for gate and threshold: x is read once (it is the big operand).
        both_TM, _, _ = self.fused_logits(x_TD)
        return both_TM[:, :-1], both_TM[:, -1] + self.threshold_bias.float()

    def read_rows(self) -> list[torch.Tensor]:
        return [self.gate_weight, self.threshold_weight]

    def threshold_bias_or_none(self) -> torch.Tensor:
        return self.threshold_bias

    def select(self, probs_TN: torch.Tensor, threshold_logit_T: torch.Tensor) -> Routing:
        tau_T = self.tau_max * torch.sigmoid(threshold_logit_T)
        scores_TN, mask_TN = adamole_select(probs_TN, tau_T, self.selection_bias)
        return Routing(probs_TN, scores_TN, mask_TN, renormalize(scores_TN, mask_TN), tau_T)


class TopKRouter(Router):
    """mole_topk, and sira (which adds gate dropout and a capacity limit)."""

    def select(self, probs_TN: torch.Tensor, _: None) -> Routing:
        scores_TN, mask_TN = topk_select(probs_TN, self.cfg.top_k, self.selection_bias)
        return Routing(probs_TN, scores_TN, mask_TN, renormalize(scores_TN, mask_TN))


class ThresholdRouter(Router):
    """mole_threshold: a fixed threshold on p."""

    def select(self, probs_TN: torch.Tensor, _: None) -> Routing:
        scores_TN, mask_TN = threshold_select(probs_TN, self.cfg.effective_threshold, self.selection_bias)
        return Routing(probs_TN, scores_TN, mask_TN, renormalize(scores_TN, mask_TN))


ROUTERS = {"adamole": AdaMoLERouter, "mole_topk": TopKRouter, "sira": TopKRouter, "mole_threshold": ThresholdRouter}


def build_router(cfg: AdapterConfig, in_features: int, *, device=None, dtype=None) -> Router:
    return ROUTERS[cfg.method](cfg, in_features, device=device, dtype=dtype)
