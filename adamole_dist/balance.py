"""Load-balancing loss and per-layer routing statistics. Pure functions.

Legend: T tokens, N experts.

Switch-style loss per layer: N * sum_i f_i * P_i with f_i the fraction of counted tokens
that select expert i and P_i the mean gate probability (variant ``switch``) or the mean of
p_i - tau (variant ``reference``, as the public AdaMoLE code). Only P carries a gradient.
"""

from __future__ import annotations

import torch

# Layout of the per-layer statistics vector accumulated during training and evaluation.
STAT_TOKENS, STAT_ACTIVE, STAT_TAU, STAT_NONE, STAT_DROPPED, STAT_ROUTED = range(6)
NUM_SCALAR_STATS = 6


def load_balancing_loss(
    probs_TN: torch.Tensor,
    mask_TN: torch.Tensor,
    count_T: torch.Tensor,
    variant: str = "switch",
    tau_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """N * sum_i f_i P_i over the tokens with ``count_T`` (float 0/1)."""
    N = probs_TN.shape[-1]
    f_N, P_N = balance_terms(probs_TN, mask_TN, count_T, variant, tau_T)
    return N * (f_N * P_N).sum()


def global_load_balancing_loss(
    probs_TN: torch.Tensor,
    mask_TN: torch.Tensor,
    count_T: torch.Tensor,
    variant: str,
    tau_T: torch.Tensor | None,
    all_reduce,
    world_size: int,
) -> torch.Tensor:
    """N * sum_i f_i P_i with f and P over the tokens of every data-parallel rank.

    The value is the global loss on every rank. Its gradient reaches this rank's tokens as
    world_size * dL/dp: DeepSpeed averages gradients over the ranks, and the average of the
    ranks' parts times world_size is the global loss's gradient."""
    N = probs_TN.shape[-1]
    p_TN = probs_TN - tau_T.unsqueeze(-1) if variant == "reference" else probs_TN
    c_T1 = count_T.unsqueeze(-1)
    p_sum_N = (p_TN * c_T1).sum(0)
    local = torch.cat([(mask_TN.to(probs_TN.dtype) * c_T1).sum(0), p_sum_N.detach(), count_T.sum().reshape(1)])
    total = all_reduce(local.detach().clone())
    n = total[-1].clamp(min=1.0)
    f_N = total[:N] / n
    value = N * (f_N * total[N : 2 * N] / n).sum()
    mine = N * (f_N * p_sum_N / n).sum()
    return value + world_size * (mine - mine.detach())


def balance_terms(
    probs_TN: torch.Tensor,
    mask_TN: torch.Tensor,
    count_T: torch.Tensor,
    variant: str = "switch",
    tau_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_N, P_N) of the load-balancing loss; f carries no gradient."""
    n_tokens = count_T.sum().clamp(min=1.0)
    f_N = (mask_TN.to(probs_TN.dtype) * count_T.unsqueeze(-1)).sum(0).detach() / n_tokens
    if variant == "reference":
        if tau_T is None:
            raise ValueError("aux_loss_variant 'reference' needs a threshold (adamole only)")
        p_TN = probs_TN - tau_T.unsqueeze(-1)
    elif variant == "switch":
        p_TN = probs_TN
    else:
        raise ValueError(f"aux_loss_variant ({variant!r}) must be 'switch' or 'reference'")
    P_N = (p_TN * count_T.unsqueeze(-1)).sum(0) / n_tokens
    return f_N, P_N


@torch.no_grad()
def routing_stats(
    kept_TN: torch.Tensor,
    routed_TN: torch.Tensor,
    weights_TN: torch.Tensor,
    valid_T: torch.Tensor,
    tau_T: torch.Tensor | None,
) -> torch.Tensor:
    """Sums over valid tokens: [tokens, active pairs, tau, tokens with no active expert,
    dropped pairs, routed pairs, per-expert load x N] as float64 (accumulate, then divide)."""
    v_T = valid_T.to(torch.float64)
    kept = kept_TN.to(torch.float64) * v_T.unsqueeze(-1)
    routed = routed_TN.to(torch.float64) * v_T.unsqueeze(-1)
    no_delta_T = (weights_TN.sum(-1) <= 0).to(torch.float64) * v_T
    tau_sum = (tau_T.to(torch.float64) * v_T).sum() if tau_T is not None else v_T.new_zeros(())
    scalars = torch.stack(
        [v_T.sum(), kept.sum(), tau_sum, no_delta_T.sum(), routed.sum() - kept.sum(), routed.sum()]
    )
    return torch.cat([scalars, kept.sum(0)])


def summarize_stats(stats: torch.Tensor, has_tau: bool) -> dict:
    """Per-layer summary of an accumulated statistics vector."""
    s = stats.double().cpu()
    tokens = max(s[STAT_TOKENS].item(), 1.0)
    active = s[STAT_ACTIVE].item()
    load = s[NUM_SCALAR_STATS:]
    load_share = (load / load.sum()).tolist() if load.sum() > 0 else [0.0] * len(load)
    return {
        "tokens": int(s[STAT_TOKENS].item()),
        "mean_active_experts": active / tokens,
        "mean_tau": s[STAT_TAU].item() / tokens if has_tau else None,
        "no_active_fraction": s[STAT_NONE].item() / tokens,
        "dropped_pairs": int(s[STAT_DROPPED].item()),
        "dropped_fraction": s[STAT_DROPPED].item() / max(s[STAT_ROUTED].item(), 1.0),
        "expert_load": load_share,
    }
