"""One layer's routing in one autograd node: from the router's logits to the combine weights, the
load-balancing loss and the routing statistics, with the backward written out by hand.

Tensor-name suffixes (T tokens, N experts, ...; U the columns summed over the tokens): adamole_dist/glossary.py.

Why: routing.py + balance.py + routing_stats.py compute the same maths as a chain of small tensor
operators, and autograd adds several more per operator in the backward (113 computing operators per
adapted layer's forward and backward against LoRA's 24). On a GPU every operator is a kernel launch:
at small micro batches the launches, not the arithmetic, set the step time. Here the forward runs
without autograd (one operator per formula) and the backward is the closed form below.

The maths (per token; s: the scores renormalised over, m: the selected experts, c: 1 for a token whose
routing counts -- a real one, or any one with route_padding):

    p = softmax(l)        adamole: tau = tau_max * sigmoid(t),  a = p - tau,  s = a,  m = a >= 0
                          mole_topk: s = p, m = top-k of p;     mole_threshold: s = p, m = p >= thr
    k = s * m,   d = sum_i k_i,   w = k / d   (d = 0: w = 0)
    aux = N * sum_i F_i P_i,   F_i = sum_t c m_i / n (no gradient),   P_i = sum_t c q_i / n,   n = sum_t c
          (q = p: "switch";  q = a: "reference")

    backward:  dk = (dw - <dw, w>) / d    (d = 0: dk = dw),   ds = dk * m,   dq = daux * N / n^2 * c * F_sum
               adamole: da = ds (+ dq, reference),  dp = da (+ dq, switch),  dtau = -sum_i da_i
               dl = softmax_backward(dp, p),   dt = -tau_max * sum_i da_i * sigmoid'(t)

These are the formulas of routing.py (``adamole_select``, ``topk_select``, ``threshold_select``,
``renormalize``) and balance.py (``load_balancing_loss``); tests/unit/moe/test_fused_routing.py holds
values and gradients equal to that chain's. The chain stays for what this node does not cover (see
``fused_rule``): capacity limits, aux-loss-free balancing biases, SiRA's gate dropout and the global
(all-reduced) aux loss.

Statistics: the same reduction over the tokens that gives the aux loss its column sums also gives the
statistics' ([m_N, sigmoid(t), d > 0, c]); each layer adds them to a float64 tensor of its own on the
device (a tensor, so a compiled block reuses one graph for every layer), turned into routing_stats.py's
layout (``laid_out``) only when read: the trainer reads at log time. A token counts as "no expert
fired" when d > 0 fails (a NaN row too).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from adamole_dist.moe.routing_stats import NUM_SCALAR_STATS, STAT_ACTIVE, STAT_NONE, STAT_ROUTED, STAT_TAU, STAT_TOKENS

FUSED_METHODS = ("adamole", "mole_topk", "mole_threshold")


@dataclass(frozen=True)
class RoutingRule:
    """What the fused node needs of the adapter config (hashable: cached per layer and mode)."""

    method: str  # one of FUSED_METHODS
    num_experts: int
    tau_max: float = 0.0  # adamole
    top_k: int = 0  # mole_topk
    threshold: float = 0.0  # mole_threshold
    aux_variant: str = "switch"  # "switch" or "reference" (adamole only)
    with_aux: bool = True  # compute the load-balancing loss (training with a coefficient > 0)

    @property
    def has_tau(self) -> bool:
        return self.method == "adamole"

    @property
    def stat_columns(self) -> int:
        """Columns of the statistics prefix of the summed columns: m_N, sigmoid(t) (adamole), d > 0, c."""
        return self.num_experts + (1 if self.has_tau else 0) + 2


def fused_rule(cfg) -> dict[bool, RoutingRule] | None:
    """The rules of an AdapterConfig for evaluation (False) and training (True), or None where the fused
    node does not cover it (capacity, balance bias, SiRA's gate dropout)."""
    if (cfg.method not in FUSED_METHODS or cfg.effective_capacity_factor > 0 or cfg.balance_bias_rate > 0
            or cfg.has_gate_dropout):
        return None
    base = RoutingRule(cfg.method, cfg.num_experts, tau_max=cfg.effective_tau_max if cfg.has_tau else 0.0,
                       top_k=cfg.top_k, threshold=cfg.effective_threshold if cfg.method == "mole_threshold" else 0.0,
                       aux_variant=cfg.aux_loss_variant, with_aux=False)
    return {False: base, True: dataclasses.replace(base, with_aux=cfg.aux_loss_coeff > 0)}


def _constant(value: float, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached constant (a Python number in torch.where, or a vector to reduce with, would be made anew
    every call: one more operator). Compiled code makes it in the graph, where it costs nothing."""
    if torch.compiler.is_compiling():
        return torch.full((length,) if length else (), value, device=device, dtype=dtype)
    return _cached_constant(value, length, device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(value: float, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length,) if length else (), value, device=device, dtype=dtype)


def select(rule: RoutingRule, logits_TM: torch.Tensor, bias: torch.Tensor | None):
    """(probs_TN, scores_TN, mask_TN, sigmoid of the threshold logit or None)."""
    N = rule.num_experts
    p_TN = logits_TM[:, :N].softmax(-1)
    if rule.method == "adamole":
        assert bias is not None, "adamole's router has a threshold bias"
        sig_T = torch.sigmoid(logits_TM[:, N] + bias)
        a_TN = p_TN - (rule.tau_max * sig_T).unsqueeze(-1)
        return p_TN, a_TN, a_TN >= 0, sig_T
    if rule.method == "mole_topk":
        top_TE = p_TN.topk(rule.top_k, dim=-1).indices
        return p_TN, p_TN, torch.zeros_like(p_TN, dtype=torch.bool).scatter_(-1, top_TE, True), None
    return p_TN, p_TN, p_TN >= rule.threshold, None


def summed_columns(m_TN, sig_T, positive_T1, count_T, q_TN, dtype: torch.dtype) -> torch.Tensor:
    """[T, C]: m_N, sigmoid(t) (adamole), d > 0, c (1 everywhere when ``count_T`` is None: a cached
    constant, no operator), q_N (with the aux loss)."""
    if count_T is None:
        count_T = _constant(1.0, m_TN.shape[0], m_TN.device, dtype)
    columns = [m_TN] + ([sig_T.unsqueeze(-1)] if sig_T is not None else []) + [positive_T1, count_T.unsqueeze(-1)]
    return torch.cat(columns + ([q_TN] if q_TN is not None else []), dim=-1)


class FusedRouting(torch.autograd.Function):
    """(weights_TN, aux or None, mask_TN, statistics sums) from the router's logits; see the module docstring.

    ``logits_TM``: the gate logits [T, N] (adamole: then the threshold logit without its bias, [T, N + 1]);
    ``bias``: adamole's threshold bias [1] (else None); ``valid_T``: the real tokens (bool; None: all are);
    ``count_T``: 1.0 for the tokens whose routing counts (None when every token routes: no mask, or
    route_padding). The statistics sums (``RoutingSums.add``) count the real tokens only."""

    @staticmethod
    def forward(ctx, logits_TM, bias, valid_T, count_T, rule: RoutingRule):
        ctx.set_materialize_grads(False)
        p_TN, s_TN, m_TN, sig_T = select(rule, logits_TM, bias)
        if count_T is not None:
            m_TN = m_TN & valid_T.unsqueeze(-1)
        k_TN = s_TN * m_TN
        d_T1 = k_TN.sum(-1, keepdim=True)
        positive_T1 = d_T1 > 0
        safe_T1 = torch.where(positive_T1, d_T1, _constant(1.0, 0, d_T1.device, d_T1.dtype))
        w_TN = k_TN / safe_T1
        q_TN = (s_TN if rule.aux_variant == "reference" else p_TN) if rule.with_aux else None
        columns_TU = summed_columns(m_TN, sig_T, positive_T1, count_T, q_TN, p_TN.dtype)
        sums_U = columns_TU.sum(0) if count_T is None else torch.mv(columns_TU.t(), count_T)
        aux, coef = None, None
        if rule.with_aux:
            aux, coef = aux_loss(rule, sums_U, count_T, m_TN.shape[0])
        if count_T is None and valid_T is not None:  # padding routed: the statistics count real tokens only
            real_T = valid_T.to(columns_TU.dtype)
            stat_sums_U = torch.mv(summed_columns(m_TN, sig_T, positive_T1, real_T, None, p_TN.dtype).t(), real_T)
        else:
            stat_sums_U = sums_U[: rule.stat_columns]
        ctx.mark_non_differentiable(stat_sums_U)
        ctx.save_for_backward(p_TN, w_TN, m_TN, safe_T1, sig_T, count_T, sums_U[: rule.num_experts],
                              coef if isinstance(coef, torch.Tensor) else None)
        ctx.rule, ctx.has_bias, ctx.coef = rule, bias is not None, coef
        return w_TN, aux, m_TN, stat_sums_U

    @staticmethod
    def backward(ctx, g_w, g_aux, _g_mask, _g_sums):
        p_TN, w_TN, m_TN, safe_T1, sig_T, count_T, load_N, coef_t = ctx.saved_tensors
        rule, coef = ctx.rule, ctx.coef if coef_t is None else coef_t
        if g_w is None:  # the weights reached no loss (only the aux loss did)
            g_s = torch.zeros_like(p_TN)
        else:
            row_dot_T1 = torch.bmm(g_w.unsqueeze(1), w_TN.unsqueeze(-1)).squeeze(-1)  # <dw, w> per token
            g_s = (g_w - row_dot_T1) / safe_T1 * m_TN
        g_aux = g_aux if rule.with_aux else None
        if rule.method != "adamole":
            g_p = with_aux_gradient(g_s, g_aux, coef, load_N, count_T)
            return torch.ops.aten._softmax_backward_data(g_p, p_TN, -1, p_TN.dtype), None, None, None, None
        reference = rule.aux_variant == "reference"
        g_a = with_aux_gradient(g_s, g_aux, coef, load_N, count_T) if reference else g_s
        g_p = g_a if reference else with_aux_gradient(g_s, g_aux, coef, load_N, count_T)
        minus_tau_max_N = _constant(-rule.tau_max, rule.num_experts, g_a.device, g_a.dtype)
        g_t = torch.ops.aten.sigmoid_backward(torch.mv(g_a, minus_tau_max_N), sig_T)
        g_l = torch.cat([torch.ops.aten._softmax_backward_data(g_p, p_TN, -1, p_TN.dtype), g_t.unsqueeze(-1)], dim=-1)
        return g_l, (g_t.sum().reshape(1) if ctx.has_bias else None), None, None, None


def aux_loss(rule: RoutingRule, sums_U: torch.Tensor, count_T: torch.Tensor | None, T: int):
    """(N / n^2 * <F_sum, P_sum>, the factor N / n^2: a float when every token counts, else a tensor)."""
    N = rule.num_experts
    load_N, q_N = sums_U[:N], sums_U[-N:]
    if count_T is None:
        coef = N / max(T, 1) ** 2
        # addmv with beta 0: the dot product and its factor in one operator (the first argument is ignored)
        return torch.addmv(load_N[:1], q_N.unsqueeze(0), load_N, beta=0, alpha=coef).reshape(()), coef
    coef = N / sums_U[rule.stat_columns - 1].clamp(min=1.0) ** 2
    return torch.dot(load_N, q_N) * coef, coef


def with_aux_gradient(g_q: torch.Tensor, g_aux: torch.Tensor | None, coef, load_N: torch.Tensor,
                      count_T: torch.Tensor | None) -> torch.Tensor:
    """g_q + d aux / d q_TN, where d aux / d q_tn = g_aux * N / n^2 * c_t * F_sum_n (``coef`` = N / n^2);
    g_q itself where no gradient reached the aux loss."""
    if g_aux is None:
        return g_q
    if count_T is None and not isinstance(coef, torch.Tensor):
        return torch.add(g_q, load_N * g_aux, alpha=coef)
    term = load_N * (g_aux * coef)
    return g_q + (term if count_T is None else count_T.unsqueeze(-1) * term)


def laid_out(sums_U: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """routing_stats.py's vector [tokens, active, tau, none, dropped (0: no capacity), routed, load_N] (float64)
    from a layer's accumulated statistics sums [m_N, sigmoid(t) (adamole), d > 0, c]."""
    N = rule.num_experts
    tokens, active = sums_U[-1], sums_U[:N].sum()
    out = torch.zeros(NUM_SCALAR_STATS + N, dtype=torch.float64, device=sums_U.device)
    out[STAT_TOKENS], out[STAT_ACTIVE], out[STAT_NONE], out[STAT_ROUTED] = tokens, active, tokens - sums_U[-2], active
    if rule.has_tau:
        out[STAT_TAU] = sums_U[N] * rule.tau_max
    out[NUM_SCALAR_STATS:] = sums_U[:N]
    return out
