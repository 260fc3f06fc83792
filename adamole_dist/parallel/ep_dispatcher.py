"""Expert-parallel dispatcher: experts sharded over the EP group, tokens exchanged by all-to-all.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Per adapted layer: route locally (layer.py) -> capacity over the group (counts exchanged) ->
plan + exchange per-destination counts -> permute -> all-to-all -> local experts (the same
dense/grouped fast path as one process) -> all-to-all back -> unpermute and sum. Every rank
joins every collective even with nothing to send, so no rank waits on another forever.
"""

from __future__ import annotations

import time

import torch

from adamole_dist.moe.capacity import (
    expert_capacity,
    keep_by_cutoff,
    keep_within_quota,
    position_quota,
    probs_candidates,
    probs_cutoff,
)
from adamole_dist.moe.experts import ExpertBank
from adamole_dist.moe.permute import combine, pack, plan_dispatch, unpack
from adamole_dist.parallel.collectives import TrafficCounters, all_gather_stack, all_to_all, exchange_counts
from adamole_dist.parallel.layout import ParallelLayout
from adamole_dist.parallel.local_dispatcher import Dispatcher, resolve_path

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # config.training.DISPATCH_DTYPES


def wire_dtype(dispatch_dtype: str) -> torch.dtype | None:
    """The wire dtype of ``--dispatch_dtype`` (None: the activations' own)."""
    if dispatch_dtype not in WIRE_DTYPES:
        raise ValueError(f"dispatch_dtype ({dispatch_dtype!r}) must be one of {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[dispatch_dtype]


class ExpertParallelDispatcher(Dispatcher):
    """``wire_dtype``: rows travel (both ways, forward and backward) in this dtype when it is narrower
    than the activations' (a compressed wire, ``--dispatch_dtype bf16``); they are restored to the
    activations' dtype on arrival, so the experts compute as they would locally, and the partial
    deltas still sum in fp32. The routing weights cross bit for bit whatever the wire."""

    def __init__(self, layout: ParallelLayout, wire_dtype: torch.dtype | None = None) -> None:
        self.layout = layout
        self.group = layout.ep_group
        self.size = layout.ep_size
        self.me = layout.ep_rank
        self.wire_dtype = wire_dtype
        self.counters = TrafficCounters()

    def wire_for(self, activations: torch.dtype) -> torch.dtype:
        """The narrower of the wire dtype and the activations' dtype."""
        if self.wire_dtype is None or self.wire_dtype.itemsize >= activations.itemsize:
            return activations
        return self.wire_dtype

    # -- capacity over the group --------------------------------------------------------------
    def capacity_keep(self, mask_TN, probs_TN, capacity_factor, policy):
        if capacity_factor <= 0:
            return mask_TN
        T, N = mask_TN.shape
        counts_M = torch.cat([mask_TN.sum(0), torch.tensor([T], device=mask_TN.device)])
        counts_JM = all_gather_stack(counts_M, self.group, self.size)
        counts_JN = counts_JM[:, :N]
        capacity = expert_capacity(int(counts_JN.sum().item()), N, capacity_factor)  # NOTE: device sync
        if capacity == 0:
            # Nothing routed anywhere in the group (all padding, or no expert over its threshold):
            # every rank sees the same gathered counts, so all of them take this branch together.
            return torch.zeros_like(mask_TN)
        if policy == "position":
            return keep_within_quota(mask_TN, position_quota(counts_JN, self.me, capacity))
        stride = int(counts_JM[:, N].max().item()) + 1
        vals_QN, pos_QN = probs_candidates(mask_TN, probs_TN, capacity)
        vals = all_gather_stack(vals_QN, self.group, self.size)
        pos = all_gather_stack(pos_QN, self.group, self.size)
        p_N, g_N = probs_cutoff(vals, pos, capacity, stride)
        return keep_by_cutoff(mask_TN, probs_TN, p_N, g_N, self.me, stride)

    # -- dispatch and combine -------------------------------------------------------------------
    def __call__(self, x_TD, weights_TN, mask_TN, bank: ExpertBank, path):
        c = self.counters
        t0 = time.perf_counter()
        T, D = x_TD.shape
        L = bank.num_experts
        O = bank.lora_B.shape[-1]
        es = x_TD.element_size()  # the uncompressed minimum counts rows in the activations' dtype
        wire = self.wire_for(x_TD.dtype)
        plan = plan_dispatch(mask_TN, self.size)
        recv_counts = exchange_counts(plan.send_counts_J, self.group)
        send, recv = plan.send_counts_J.tolist(), recv_counts.tolist()  # NOTE: device sync for split sizes
        rows_SX = pack(x_TD.to(wire), weights_TN, mask_TN, plan, self.size)
        t1 = time.perf_counter()
        rows_VX = all_to_all(rows_SX, recv, send, self.group, c, self.me, D * es, D * es)
        t2 = time.perf_counter()
        x_VD, w_VL, m_VL = unpack(rows_VX, D, L)
        # The partial deltas return in the experts' dtype, as the local path keeps them until the layer
        # adds them to the base output: fp32 experts under bf16 activations sum in fp32 on both paths.
        # A narrower wire rounds them once for the trip.
        y_VO = bank(x_VD.to(x_TD.dtype), w_VL, m_VL, resolve_path(path, m_VL, bank))
        t3 = time.perf_counter()
        ys = y_VO.element_size()
        y_SO = all_to_all(y_VO.to(self.wire_for(y_VO.dtype)), send, recv, self.group, c, self.me, O * ys, O * ys)
        t4 = time.perf_counter()
        out = combine(y_SO, plan, T)
        c.add_time("permute", t1 - t0)
        c.add_time("a2a", (t2 - t1) + (t4 - t3))
        c.add_time("expert_compute", t3 - t2)
        c.add_time("combine", time.perf_counter() - t4)
        return out
