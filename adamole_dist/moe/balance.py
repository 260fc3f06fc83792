"""Load-balancing losses (per layer, and over the data-parallel ranks). Pure functions.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Switch-style loss per layer: N * sum_i f_i * P_i with f_i the fraction of counted tokens
that select expert i and P_i the mean gate probability (variant ``switch``) or the mean of
p_i - tau (variant ``reference``, as the public AdaMoLE code). Only P carries a gradient.
"""

from __future__ import annotations

import torch


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
    p_TN = probs_TN
    if variant == "reference":
        assert tau_T is not None, "the reference variant subtracts the threshold: tau_T is required"
        p_TN = probs_TN - tau_T.unsqueeze(-1)
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
