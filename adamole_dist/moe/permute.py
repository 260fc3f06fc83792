"""Permute / unpermute for expert-parallel dispatch. Pure functions, no process group.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

A token goes to rank j once if any of its kept experts lives on j (deduplicated per
destination), carrying its weights and mask bits for j's L experts, so the receiver
computes all of them in one pass and returns one O-row.

Precision: rows travel in the activations' dtype, but the routing weights are fp32 on every
path. When the activations are narrower (bf16/fp16), each fp32 weight travels bit for bit as
two 16-bit columns (``encode_weights``), and its gradient comes back the same way, so a bf16
run rounds the weights exactly where the local path does. ``combine`` sums the returned
partial deltas in fp32 (and the receivers return them in the experts' dtype), as the local path's
single matmul over all experts accumulates.
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


class _BitCast(torch.autograd.Function):
    """Reinterpret the bytes of the last dimension as another dtype; the gradient is carried back
    by the inverse reinterpretation, so an fp32 gradient crosses a 16-bit wire bit for bit."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = t.dtype
        return t.contiguous().view(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous().view(ctx.dtype), None


def weight_columns(experts_per_rank: int, wire_dtype: torch.dtype) -> int:
    """Columns of the wire dtype that carry L fp32 weights exactly."""
    return experts_per_rank * 4 // wire_dtype.itemsize if wire_dtype.itemsize < 4 else experts_per_rank


def encode_weights(w_SL: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor:
    """fp32 weights as columns of the wire dtype, exactly (bit cast when narrower, cast otherwise)."""
    w_SL = w_SL.float()
    if wire_dtype.itemsize < 4:
        return _BitCast.apply(w_SL, wire_dtype)
    return w_SL.to(wire_dtype)


def decode_weights(cols: torch.Tensor) -> torch.Tensor:
    """The fp32 weights that ``encode_weights`` packed into ``cols``."""
    if cols.element_size() < 4:
        return _BitCast.apply(cols, torch.float32)
    return cols.float()


def pack(x_TD: torch.Tensor, weights_TN: torch.Tensor, kept_TN: torch.Tensor, plan: DispatchPlan,
         num_ranks: int) -> torch.Tensor:
    """Rows [x | fp32 weights of the destination's L experts (encoded) | their kept bits], in plan order."""
    L = kept_TN.shape[1] // num_ranks
    cols_SL = plan.dest_S.unsqueeze(1) * L + torch.arange(L, device=x_TD.device)
    rows_S1 = plan.token_S.unsqueeze(1)
    w_SC = encode_weights(weights_TN[rows_S1, cols_SL], x_TD.dtype)
    m_SL = kept_TN[rows_S1, cols_SL].to(x_TD.dtype)
    return torch.cat([x_TD.index_select(0, plan.token_S), w_SC, m_SL], dim=1)


def unpack(rows: torch.Tensor, in_features: int, experts_per_rank: int):
    """(x_VD, fp32 weights_VL, kept_VL) of received rows."""
    D, L = in_features, experts_per_rank
    C = weight_columns(L, rows.dtype)
    return rows[:, :D], decode_weights(rows[:, D : D + C]), rows[:, D + C : D + C + L] > 0.5


def combine(y_SO: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Sum each token's returned rows (one per destination) into its delta, in fp32 (at least)."""
    dtype = torch.promote_types(y_SO.dtype, torch.float32)
    out = torch.zeros(num_tokens, y_SO.shape[1], device=y_SO.device, dtype=dtype)
    return out.index_add_(0, plan.token_S, y_SO.to(dtype))
