"""Permute / unpermute for expert-parallel dispatch. Pure functions, no process group.

Legend: T tokens, D input features, O output features, N global experts, J ranks of the EP
group, L = N / J experts per rank, S rows sent (one per (token, destination rank) pair).

A token goes to rank j once if any of its kept experts lives on j (deduplicated per
destination), carrying its weights and mask bits for j's L experts, so the receiver
computes all of them in one pass and returns one O-row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    token_S: torch.Tensor  # source token of each sent row, rows grouped by destination
    dest_S: torch.Tensor  # destination rank of each row (non-decreasing)
    send_counts_J: torch.Tensor  # rows per destination


def plan_dispatch(kept_TN: torch.Tensor, num_ranks: int) -> DispatchPlan:
    T, N = kept_TN.shape
    if N % num_ranks:
        raise ValueError(f"num_experts ({N}) is not divisible by the EP group size ({num_ranks})")
    send_TJ = kept_TN.view(T, num_ranks, N // num_ranks).any(-1)
    dest_S, token_S = send_TJ.t().nonzero(as_tuple=True)  # sorted by destination, then token
    return DispatchPlan(token_S, dest_S, torch.bincount(dest_S, minlength=num_ranks))


def pack(x_TD: torch.Tensor, weights_TN: torch.Tensor, kept_TN: torch.Tensor, plan: DispatchPlan,
         num_ranks: int) -> torch.Tensor:
    """Rows [x | weights of the destination's L experts | their kept bits], in plan order."""
    L = kept_TN.shape[1] // num_ranks
    cols_SL = plan.dest_S.unsqueeze(1) * L + torch.arange(L, device=x_TD.device)
    rows_S1 = plan.token_S.unsqueeze(1)
    w_SL = weights_TN[rows_S1, cols_SL].to(x_TD.dtype)
    m_SL = kept_TN[rows_S1, cols_SL].to(x_TD.dtype)
    return torch.cat([x_TD.index_select(0, plan.token_S), w_SL, m_SL], dim=1)


def unpack(rows: torch.Tensor, in_features: int, experts_per_rank: int):
    """(x_RD, weights_RL, kept_RL) of received rows."""
    D, L = in_features, experts_per_rank
    return rows[:, :D], rows[:, D : D + L].float(), rows[:, D + L : D + 2 * L] > 0.5


def combine(y_SO: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum each token's returned rows (one per destination) into its delta."""
    out = torch.zeros(num_tokens, y_SO.shape[1], device=y_SO.device, dtype=y_SO.dtype)
    return out.index_add_(0, plan.token_S, y_SO)
