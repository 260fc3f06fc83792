"""Dispatchers: given routed tokens and an expert bank, return the weighted expert delta.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

One interface, one class per strategy. ``LocalDispatcher`` computes every expert on this
rank. Capacity lives here too: which pairs an expert keeps depends on which tokens it sees,
i.e. on the dispatch strategy.
"""

from __future__ import annotations

import torch

from adamole_dist.moe.capacity import apply_capacity, expert_capacity_on_device
from adamole_dist.moe.experts import DENSE_ONLY_TOTAL_RANK, ExpertBank, choose_compute_path


class Dispatcher:
    # Traffic and time counters of a dispatcher that communicates (collectives.TrafficCounters).
    counters = None

    def capacity_keep(
        self, mask_TN: torch.Tensor, probs_TN: torch.Tensor, capacity_factor: float, policy: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, x_TD: torch.Tensor, weights_TN: torch.Tensor, mask_TN: torch.Tensor, bank: ExpertBank, path: str
    ) -> torch.Tensor:
        raise NotImplementedError


def resolve_path(path: str, mask_TN: torch.Tensor, bank: ExpertBank) -> str:
    if path != "auto":
        return path
    if bank.num_experts * bank.rank <= DENSE_ONLY_TOTAL_RANK:  # dense whatever the sparsity: no sync
        return "dense"
    avg_active = mask_TN.sum().item() / max(mask_TN.shape[0], 1)  # NOTE: device sync
    return choose_compute_path(bank.num_experts, bank.rank, avg_active)


class LocalDispatcher(Dispatcher):
    """All experts live on this rank: capacity over this rank's tokens, compute in place."""

    def capacity_keep(self, mask_TN, probs_TN, capacity_factor, policy):
        if capacity_factor <= 0:
            return mask_TN
        capacity = expert_capacity_on_device(mask_TN, capacity_factor)  # a tensor: no host sync
        return apply_capacity(mask_TN, probs_TN, capacity, policy)

    def __call__(self, x_TD, weights_TN, mask_TN, bank, path):
        return bank(x_TD, weights_TN, mask_TN, resolve_path(path, mask_TN, bank))
