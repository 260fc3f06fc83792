"""Expert-parallel dispatcher: experts sharded over the EP group, tokens exchanged by all-to-all.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Per adapted layer: route locally (layer.py) -> capacity over the group (counts exchanged) ->
plan the rows for the OTHER ranks + exchange per-destination counts -> gather those rows (no copy
when every token goes once, in order) -> all-to-all of the rows and, beside them, their routing
columns -> the received rows through this rank's experts (the same dense/grouped fast path as one
process) -> all-to-all back -> this rank's own experts on all its tokens, in place, adding the
returned deltas (inside their matmul when every token went once, in order: fused_combine; else
summed or index-added after). Every rank joins every collective even with nothing to send, so no
rank waits on another forever.
"""

from __future__ import annotations

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
from adamole_dist.moe.permute import (
    SEND_ALL_FRACTION,
    combine,
    gather_rows,
    local_columns,
    plan_dispatch,
    routing_columns,
    split_routing_columns,
)
from adamole_dist.parallel.collectives import (
    TrafficCounters,
    all_gather_stack,
    all_to_all,
    exchange_counts,
    land_all_to_all,
    launch_all_to_all,
    remote_rows,
)
from adamole_dist.parallel.layout import ParallelLayout
from adamole_dist.parallel.local_dispatcher import Dispatcher, resolve_path

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # config.training.DISPATCH_DTYPES


def wire_dtype(dispatch_dtype: str) -> torch.dtype | None:
    """The wire dtype of ``--dispatch_dtype`` (None: the activations' own)."""
    if dispatch_dtype not in WIRE_DTYPES:
        raise ValueError(f"dispatch_dtype ({dispatch_dtype!r}) must be one of {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[dispatch_dtype]


def wire_bytes(dispatch_dtype: str) -> int | None:
    """The element size of ``--dispatch_dtype``'s wire (None: the activations' own)."""
    dtype = wire_dtype(dispatch_dtype)
    return dtype.itemsize if dtype is not None else None


def overlap_enabled(ep_overlap: str, device: torch.device) -> bool:
    """``--ep_overlap``: on, off, or auto = on only for CUDA tensors. NCCL runs an exchange on its
    own stream, so it really overlaps the compute. Under gloo on CPU the exchange is the kernel
    copying rows through TCP on the same cores as the compute: nothing to hide it behind (measured
    on 2 cores: 219-234 ms per step with overlap, 205-231 ms without)."""
    if ep_overlap not in ("auto", "on", "off"):
        raise ValueError(f"ep_overlap ({ep_overlap!r}) must be auto, on or off")
    return ep_overlap == "on" or (ep_overlap == "auto" and torch.device(device).type == "cuda")


def fused_combine(every_token_once: bool, expert_dtype: torch.dtype) -> bool:
    """Whether the own share can add the returned deltas inside its matmul (``ExpertBank(add_to=)``)
    instead of a sum after it: when every token went once, in order, so the returned rows line up
    with the tokens, and the experts compute in fp32 or wider, where permute.combine sums anyway."""
    return every_token_once and torch.promote_types(expert_dtype, torch.float32) == expert_dtype


class ExpertParallelDispatcher(Dispatcher):
    """``wire_dtype``: rows travel (both ways, forward and backward) in this dtype when it is narrower
    than the activations' (a compressed wire, ``--dispatch_dtype bf16``); they are restored to the
    activations' dtype on arrival, so the experts compute as they would locally, and the partial
    deltas still sum in fp32. The routing weights travel as fp32 columns beside the rows: exact."""

    def __init__(self, layout: ParallelLayout, wire_dtype: torch.dtype | None = None, overlap: bool = True) -> None:
        self.layout = layout
        self.overlap = overlap
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
        # NOTE: device sync: the group's routed pairs and its largest token count, read together (the
        # capacity sizes the candidates exchanged below; the stride orders the group's tokens)
        routed_pairs, most_tokens = torch.stack([counts_JN.sum(), counts_JM[:, N].max()]).tolist()
        capacity = expert_capacity(routed_pairs, N, capacity_factor)
        if capacity == 0:
            # Nothing routed anywhere in the group (all padding, or no expert over its threshold):
            # every rank sees the same gathered counts, so all of them take this branch together.
            return torch.zeros_like(mask_TN)
        if policy == "position":
            return keep_within_quota(mask_TN, position_quota(counts_JN, self.me, capacity))
        stride = most_tokens + 1
        vals_QN, pos_QN = probs_candidates(mask_TN, probs_TN, capacity)
        vals = all_gather_stack(vals_QN, self.group, self.size)
        pos = all_gather_stack(pos_QN, self.group, self.size)
        p_N, g_N = probs_cutoff(vals, pos, capacity, stride)
        return keep_by_cutoff(mask_TN, probs_TN, p_N, g_N, self.me, stride)

    # -- dispatch and combine -------------------------------------------------------------------
    @staticmethod
    def remote(rows_VD, cols_VL, bank: ExpertBank, path):
        """The received rows through this rank's experts. They were restored to the activations'
        dtype, so the experts compute as they would locally; the deltas come out in the experts' dtype."""
        w_VL, m_VL = split_routing_columns(cols_VL)
        return bank(rows_VD, w_VL, m_VL, resolve_path(path, m_VL, bank))

    def __call__(self, x_TD, weights_TN, mask_TN, bank: ExpertBank, path):
        c = self.counters
        with c.span("permute", x_TD.device):  # the plan, its count exchange, the rows and routing columns
            T, D = x_TD.shape
            L = bank.num_experts
            O = bank.lora_B.shape[-1]
            es = x_TD.element_size()  # the uncompressed minimum counts values in the activations' dtype
            wire = self.wire_for(x_TD.dtype)
            plan = plan_dispatch(mask_TN, self.size, self.me, SEND_ALL_FRACTION)  # rows for the other ranks only
            # One exchange carries both counts: rows sent, and of those the ones with a kept expert there.
            counts_in = exchange_counts(torch.stack([plan.send_counts_J, plan.needed_counts_J], 1), self.group)
            # NOTE: the one device sync of the forward: the split sizes (and the traffic minimum), read together
            J = self.size
            host = torch.cat([plan.send_counts_J, plan.needed_counts_J, counts_in.t().reshape(-1)]).tolist()
            send, needed_send, recv, needed_recv = (host[i * J:(i + 1) * J] for i in range(4))
            needed_out, needed_in = remote_rows(needed_send, self.me), remote_rows(needed_recv, self.me)
            once = plan.sends_every_token_once(send)
            es_y = bank.lora_A.element_size()  # the deltas return in the experts' dtype
            rows_SD = gather_rows(x_TD, plan, once).to(wire)
            cols_SL = routing_columns(weights_TN, mask_TN, plan, self.size)

        def timed(fn, *args):
            with c.span("expert_compute", x_TD.device):
                return fn(*args)

        def local(x, w, m, add_to=None):
            m_TL = local_columns(m, self.me, L)
            return bank(x, local_columns(w, self.me, L), m_TL, resolve_path(path, m_TL, bank), add_to)

        # Traffic minimum (summed over ranks): each needed row once, D values out and O back, both passes.
        rows_min, y_min = (needed_out * D * es, needed_in * D * es), (needed_in * O * es_y, needed_out * O * es_y)
        y_wire = self.wire_for(bank.lora_A.dtype)
        fused = not self.overlap and fused_combine(once, bank.lora_A.dtype)
        if self.overlap:
            # This rank's own experts run in place on all its tokens, in two halves: the first while
            # the rows travel out, the second while the deltas travel back. In the backward autograd
            # reaches them in the same places (later-created nodes first), between each gradient
            # exchange's launch and its landing.
            # split, not sliced: x's gradient is then one concatenation of the halves' gradients,
            # where two slices would each write a zero-filled copy of x and sum them
            halves = [T // 2, T - T // 2]
            (x1, x2), (w1, w2), (m1, m2) = (t.split(halves) for t in (x_TD, weights_TN, mask_TN))
            rows_flight = launch_all_to_all(rows_SD, recv, send, self.group, c, self.me, *rows_min)
            cols_flight = launch_all_to_all(cols_SL, recv, send, self.group, c, self.me, 0, 0)
            local_first = timed(local, x1, w1, m1)
            rows_VD, cols_VL = land_all_to_all(*rows_flight), land_all_to_all(*cols_flight)
            y_VO = timed(self.remote, rows_VD.to(x_TD.dtype), cols_VL, bank, path)
            y_flight = launch_all_to_all(y_VO.to(y_wire), send, recv, self.group, c, self.me, *y_min)
            local_TO = torch.cat([local_first, timed(local, x2, w2, m2)])
            y_SO = land_all_to_all(*y_flight)
        else:  # each exchange waited for
            rows_VD = all_to_all(rows_SD, recv, send, self.group, c, self.me, *rows_min)
            cols_VL = all_to_all(cols_SL, recv, send, self.group, c, self.me, 0, 0)  # routing: beyond the minimum
            y_VO = timed(self.remote, rows_VD.to(x_TD.dtype), cols_VL, bank, path)
            y_SO = all_to_all(y_VO.to(y_wire), send, recv, self.group, c, self.me, *y_min)
            # whole tensors, not a slice: its backward would write a zero-filled copy of x's gradient
            if fused:  # the returned deltas line up with the tokens: added as the own share writes its delta
                out = timed(local, x_TD, weights_TN, mask_TN, y_SO.to(bank.lora_A.dtype))
            else:
                local_TO = timed(local, x_TD, weights_TN, mask_TN)
        if not fused:
            with c.span("combine", x_TD.device):
                out = combine(local_TO, y_SO, plan, once)
        return out
