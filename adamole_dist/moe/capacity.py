"""Expert capacity: how many (token, expert) pairs one expert takes per step, and which it keeps.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

capacity = ceil(capacity_factor * routed_pairs / N), where routed_pairs = tokens * mean active
experts (k * tokens for top-k). ``capacity_factor == 0`` means dropless. Pure functions: the
expert-parallel dispatcher feeds them counts exchanged across its group.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(routed_pairs: int, num_experts: int, capacity_factor: float) -> int | None:
    """Pairs one expert may take; None when dropless (capacity_factor == 0)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * routed_pairs / num_experts)


def expert_capacity_on_device(mask_TN: torch.Tensor, capacity_factor: float) -> torch.Tensor:
    """``expert_capacity`` of the pairs routed in ``mask_TN``, as a 0-dim int64 tensor on its device:
    no host sync (float64, the same rounding as the Python version's)."""
    routed_pairs = mask_TN.sum().to(torch.float64)
    return torch.ceil(routed_pairs * capacity_factor / mask_TN.shape[-1]).to(torch.int64)


def keep_by_position(mask_TN: torch.Tensor, capacity: int | torch.Tensor) -> torch.Tensor:
    """Each expert keeps its first ``capacity`` pairs in token order."""
    position_TN = mask_TN.to(torch.int64).cumsum(dim=0)
    return mask_TN & (position_TN <= capacity)


def keep_by_probs(mask_TN: torch.Tensor, probs_TN: torch.Tensor, capacity: int | torch.Tensor) -> torch.Tensor:
    """Each expert keeps its ``capacity`` highest-probability pairs; ties go to the earlier token."""
    T = mask_TN.shape[0]
    key_TN = torch.where(mask_TN, probs_TN, torch.full_like(probs_TN, -1.0))
    order_TN = key_TN.argsort(dim=0, descending=True, stable=True)
    rank_TN = torch.empty_like(order_TN)
    rank_TN.scatter_(0, order_TN, torch.arange(T, device=mask_TN.device).unsqueeze(1).expand_as(order_TN))
    return mask_TN & (rank_TN < capacity)


def apply_capacity(mask_TN: torch.Tensor, probs_TN: torch.Tensor, capacity: int | torch.Tensor | None,
                   policy: str) -> torch.Tensor:
    """The surviving pairs of ``mask_TN`` under a per-expert ``capacity`` (an int or a 0-dim tensor on the
    mask's device; None = keep all)."""
    if capacity is None:
        return mask_TN
    if policy == "position":
        return keep_by_position(mask_TN, capacity)
    if policy == "probs":
        return keep_by_probs(mask_TN, probs_TN, capacity)
    raise ValueError(f"drop_policy ({policy!r}) must be 'probs' or 'position'")


# -- capacity over an expert-parallel group ------------------------------------------------------
# An expert's capacity bounds the pairs it receives from the whole EP group. Ranks order the
# group's tokens rank-major (rank 0's tokens first), which is exactly the order of the global
# batch in one process, so the group decides the same drops a single process would.
# Each rank offers Q candidates per expert (its best `capacity` by probability); G = J * Q.


def position_quota(counts_JN: torch.Tensor, my_rank: int, capacity: int) -> torch.Tensor:
    """Pairs this rank may keep per expert under the position policy: what ranks before it left."""
    before_N = counts_JN[:my_rank].sum(0)
    return (capacity - before_N).clamp(min=0)


def keep_within_quota(mask_TN: torch.Tensor, quota_N: torch.Tensor) -> torch.Tensor:
    return mask_TN & (mask_TN.to(torch.int64).cumsum(dim=0) <= quota_N)


def probs_candidates(mask_TN: torch.Tensor, probs_TN: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert the k highest-probability local pairs (ties: earlier token), padded with -inf.

    No pair outside them can survive the group-wide cut, so only these are exchanged."""
    T, N = mask_TN.shape
    key_TN = torch.where(mask_TN, probs_TN.float(), torch.full_like(probs_TN, float("-inf"), dtype=torch.float32))
    order_TN = key_TN.argsort(dim=0, descending=True, stable=True)[:k]
    vals_QN = key_TN.gather(0, order_TN)
    pos_QN = order_TN
    if order_TN.shape[0] < k:  # fewer local tokens than k
        pad = k - order_TN.shape[0]
        vals_QN = torch.cat([vals_QN, vals_QN.new_full((pad, N), float("-inf"))])
        pos_QN = torch.cat([pos_QN, pos_QN.new_zeros((pad, N))])
    return vals_QN, pos_QN


def probs_cutoff(vals_JQN: torch.Tensor, pos_JQN: torch.Tensor, capacity: int, stride: int):
    """The capacity-th best (probability desc, then global position asc) candidate per expert.

    Global position = rank * stride + local position, stride >= every rank's token count.
    Returns (p_N, g_N); an expert with fewer candidates gets p = -inf (keeps everything), and
    capacity 0 gives p = +inf (keeps nothing)."""
    J, Q, N = vals_JQN.shape
    if capacity <= 0:
        return vals_JQN.new_full((N,), float("inf")), pos_JQN.new_zeros(N)
    ranks = torch.arange(J, device=vals_JQN.device).view(J, 1, 1)
    g_GN = (ranks * stride + pos_JQN).reshape(J * Q, N)
    p_GN = vals_JQN.reshape(J * Q, N)
    by_pos = g_GN.argsort(dim=0, stable=True)
    p_sorted = p_GN.gather(0, by_pos)
    g_sorted = g_GN.gather(0, by_pos)
    by_prob = p_sorted.argsort(dim=0, descending=True, stable=True)
    p_rank = p_sorted.gather(0, by_prob)
    g_rank = g_sorted.gather(0, by_prob)
    if capacity > J * Q:
        return p_GN.new_full((N,), float("-inf")), g_GN.new_zeros(N)
    return p_rank[capacity - 1], g_rank[capacity - 1]


def keep_by_cutoff(mask_TN: torch.Tensor, probs_TN: torch.Tensor, p_N: torch.Tensor, g_N: torch.Tensor,
                   my_rank: int, stride: int) -> torch.Tensor:
    """Keep pairs ranked at or above the cut-off (probability desc, global position asc)."""
    T = mask_TN.shape[0]
    g_T1 = (my_rank * stride + torch.arange(T, device=mask_TN.device)).unsqueeze(1)
    p = probs_TN.float()
    return mask_TN & ((p > p_N) | ((p == p_N) & (g_T1 <= g_N)))
