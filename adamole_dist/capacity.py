"""Expert capacity: how many (token, expert) pairs one expert takes per step, and which it keeps.

Legend: T tokens, N experts.

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


def keep_by_position(mask_TN: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert keeps its first ``capacity`` pairs in token order."""
    position_TN = mask_TN.to(torch.int64).cumsum(dim=0)
    return mask_TN & (position_TN <= capacity)


def keep_by_probs(mask_TN: torch.Tensor, probs_TN: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert keeps its ``capacity`` highest-probability pairs; ties go to the earlier token."""
    T = mask_TN.shape[0]
    key_TN = torch.where(mask_TN, probs_TN, torch.full_like(probs_TN, -1.0))
    order_TN = key_TN.argsort(dim=0, descending=True, stable=True)
    rank_TN = torch.empty_like(order_TN)
    rank_TN.scatter_(0, order_TN, torch.arange(T, device=mask_TN.device).unsqueeze(1).expand_as(order_TN))
    return mask_TN & (rank_TN < capacity)


def apply_capacity(mask_TN: torch.Tensor, probs_TN: torch.Tensor, capacity: int | None, policy: str) -> torch.Tensor:
    """The surviving pairs of ``mask_TN`` under a per-expert ``capacity`` (None = keep all)."""
    if capacity is None:
        return mask_TN
    if policy == "position":
        return keep_by_position(mask_TN, capacity)
    if policy == "probs":
        return keep_by_probs(mask_TN, probs_TN, capacity)
    raise ValueError(f"drop_policy ({policy!r}) must be 'probs' or 'position'")
