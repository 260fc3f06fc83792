"""Expert-parallel dispatcher: experts sharded over the EP group, tokens exchanged by all-to-all.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Per adapted layer: route locally (layer.py) -> capacity over the group (counts exchanged) -> four
phases, each a method timed under its own name in ``counters`` (``counters.span``):

* ``plan`` ("permute"): the rows for the OTHER ranks, the per-destination counts exchanged, and
  from them the host split sizes, the traffic minimums and the wire dtypes (:class:`ExchangePlan`);
* ``dispatch`` ("permute"): those rows (no copy when every token goes once, in order) and, beside
  them, their routing columns;
* expert compute ("expert_compute"): ``expert_compute`` runs the received rows through this rank's
  experts (the same dense/grouped fast path as one process), ``own_share`` this rank's own experts
  on all its tokens, in place;
* ``combine`` ("combine"): the returned deltas added to the own share (summed or index-added), or,
  when every token went once, in order (``fused_combine``), added inside the own share's matmul.

Between them the rows go out and the deltas come back by all-to-all (``Exchange``, "a2a").
``__call__`` is the schedule: each exchange waited for, or (``overlap``) launched and landed with
the own share running in two halves while they travel. Every rank joins every collective even with
nothing to send, so no rank waits on another forever.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    DispatchPlan,
    gather_rows,
    local_columns,
    plan_dispatch,
    routing_columns,
    split_routing_columns,
)
from adamole_dist.moe.permute import combine as add_returned_rows
from adamole_dist.parallel.all_to_all import Exchange, MinBytes, TrafficCounters, remote_rows
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
    copying rows through TCP on the same cores as the compute: nothing to hide it behind (measured:
    benchmarks/README.md, "Measurements behind the defaults")."""
    if ep_overlap not in ("auto", "on", "off"):
        raise ValueError(f"ep_overlap ({ep_overlap!r}) must be auto, on or off")
    return ep_overlap == "on" or (ep_overlap == "auto" and torch.device(device).type == "cuda")


def fused_combine(every_token_once: bool, expert_dtype: torch.dtype) -> bool:
    """Whether the own share can add the returned deltas inside its matmul (``ExpertBank(add_to=)``)
    instead of a sum after it: when every token went once, in order, so the returned rows line up
    with the tokens, and the experts compute in fp32 or wider, where permute.combine sums anyway."""
    return every_token_once and torch.promote_types(expert_dtype, torch.float32) == expert_dtype


ROUTING_MIN: MinBytes = (0, 0)  # the routing columns travel beyond the traffic minimum, both passes


@dataclass(frozen=True)
class ExchangePlan:
    """One micro batch's dispatch, decided before any row moves (``plan``): the same on every rank
    that shares an exchange, since every split size comes from exchanged counts."""

    permute: DispatchPlan  # which token goes to which rank, in plan order (moe/permute.py)
    send: list[int]  # rows to each rank of the group (host split sizes: 0 for this rank)
    recv: list[int]  # rows from each rank
    once: bool  # every token goes once, in order: the rows are x itself, the returned deltas line up
    fused: bool  # fused_combine: the own share may add the returned deltas inside its matmul
    rows_min: MinBytes  # traffic minimum of this rank's rows out (forward) and their gradients (backward)
    deltas_min: MinBytes  # ... of its deltas back (forward) and their gradients (backward)
    activations: torch.dtype  # the rows' dtype, restored on arrival
    rows_wire: torch.dtype  # the rows' dtype on the wire
    deltas_wire: torch.dtype  # the deltas' dtype on the wire


class ExpertParallelDispatcher(Dispatcher):
    """``wire_dtype``: rows travel (both ways, forward and backward) in this dtype when it is narrower
    than the activations' (a compressed wire, ``--dispatch_dtype bf16``); they are restored to the
    activations' dtype on arrival, so the experts compute as they would locally, and the partial
    deltas still sum in fp32. The routing weights travel as fp32 columns beside the rows: exact."""

    def __init__(self, layout: ParallelLayout, wire_dtype: torch.dtype | None = None, overlap: bool = True,
                 exchange: Exchange | None = None) -> None:
        """``exchange``: the transport, when not the layout's EP group (the cost model's dry run passes
        one that plays a rank of a symmetric group in one process, costmodel/dry_run.py)."""
        self.layout = layout
        self.overlap = overlap  # the schedule: exchanges launched and landed around the own share, or waited for
        self.group = layout.ep_group
        self.size = layout.ep_size
        self.my_rank = layout.ep_rank
        self.wire_dtype = wire_dtype
        self.exchange = exchange or Exchange(self.group, self.my_rank, self.size, TrafficCounters())
        assert self.exchange.counters is not None
        self.counters = self.exchange.counters

    def wire_for(self, activations: torch.dtype) -> torch.dtype:
        """The narrower of the wire dtype and the activations' dtype."""
        if self.wire_dtype is None or self.wire_dtype.itemsize >= activations.itemsize:
            return activations
        return self.wire_dtype

    # -- capacity over the group --------------------------------------------------------------
    # Collectives stay outside compiled code (--compile, train/compile.py): a graph break here.
    @torch.compiler.disable
    def capacity_keep(self, mask_TN, probs_TN, capacity_factor, policy):
        if capacity_factor <= 0:
            return mask_TN
        T, N = mask_TN.shape
        counts_M = torch.cat([mask_TN.sum(0), torch.tensor([T], device=mask_TN.device)])
        counts_JM = self.exchange.all_gather_stack(counts_M)
        counts_JN = counts_JM[:, :N]
        # NOTE: device sync: the group's routed pairs and its largest token count, read together (the
        # capacity sizes the candidates exchanged below; the stride orders the group's tokens)
        routed_pairs, most_tokens = torch.stack([counts_JN.sum(), counts_JM[:, N].max()]).tolist()
        capacity = expert_capacity(routed_pairs, N, capacity_factor)
        assert capacity is not None  # None only when dropless, returned above
        if capacity == 0:
            # Nothing routed anywhere in the group (all padding, or no expert over its threshold):
            # every rank sees the same gathered counts, so all of them take this branch together.
            return torch.zeros_like(mask_TN)
        if policy == "position":
            return keep_within_quota(mask_TN, position_quota(counts_JN, self.my_rank, capacity))
        stride = most_tokens + 1
        vals_QN, pos_QN = probs_candidates(mask_TN, probs_TN, capacity)
        vals = self.exchange.all_gather_stack(vals_QN)
        pos = self.exchange.all_gather_stack(pos_QN)
        p_N, g_N = probs_cutoff(vals, pos, capacity, stride)
        return keep_by_cutoff(mask_TN, probs_TN, p_N, g_N, self.my_rank, stride)

    # -- the phases ------------------------------------------------------------------------------
    def plan(self, mask_TN: torch.Tensor, x_TD: torch.Tensor, bank: ExpertBank) -> ExchangePlan:
        """Which rows go where, and the split sizes of every exchange of this call (``x_TD`` and
        ``bank`` only for shapes and dtypes). One count exchange, and the one device sync of the forward."""
        with self.counters.span("permute", mask_TN.device):
            D, O = x_TD.shape[1], bank.lora_B.shape[-1]
            es = x_TD.element_size()  # the uncompressed minimum counts values in the activations' dtype
            rows_wire = self.wire_for(x_TD.dtype)
            plan = plan_dispatch(mask_TN, self.size, self.my_rank, SEND_ALL_FRACTION)  # rows for the other ranks only
            # One exchange carries both counts: rows sent, and of those the ones with a kept expert there.
            counts_in = self.exchange.counts(torch.stack([plan.send_counts_J, plan.needed_counts_J], 1))
            # NOTE: the one device sync of the forward: the split sizes (and the traffic minimum), read together
            J = self.size
            host = torch.cat([plan.send_counts_J, plan.needed_counts_J, counts_in.t().reshape(-1)]).tolist()
            send, needed_send, recv, needed_recv = (host[i * J:(i + 1) * J] for i in range(4))
            needed_out, needed_in = remote_rows(needed_send, self.my_rank), remote_rows(needed_recv, self.my_rank)
            once = plan.sends_every_token_once(send)
            es_y = bank.lora_A.element_size()  # the deltas return in the experts' dtype
        # Traffic minimum (summed over ranks): each needed row once, D values out and O back, both passes.
        return ExchangePlan(
            permute=plan, send=send, recv=recv, once=once, fused=fused_combine(once, bank.lora_A.dtype),
            rows_min=(needed_out * D * es, needed_in * D * es),
            deltas_min=(needed_in * O * es_y, needed_out * O * es_y),
            activations=x_TD.dtype, rows_wire=rows_wire, deltas_wire=self.wire_for(bank.lora_A.dtype))

    def dispatch(self, x_TD: torch.Tensor, weights_TN: torch.Tensor, mask_TN: torch.Tensor,
                 plan: ExchangePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows_SD on the wire dtype, routing columns cols_SL in fp32): what this rank sends, in plan order."""
        with self.counters.span("permute", x_TD.device):
            rows_SD = gather_rows(x_TD, plan.permute, plan.once).to(plan.rows_wire)
            return rows_SD, routing_columns(weights_TN, mask_TN, plan.permute, self.size)

    def expert_compute(self, rows_VD: torch.Tensor, cols_VL: torch.Tensor, bank: ExpertBank, path: str) -> torch.Tensor:
        """The received rows (restored to the activations' dtype, so the experts compute as they
        would locally) through this rank's experts; the deltas come out in the experts' dtype."""
        with self.counters.span("expert_compute", rows_VD.device):
            w_VL, m_VL = split_routing_columns(cols_VL)
            return bank(rows_VD, w_VL, m_VL, resolve_path(path, m_VL, bank))

    def own_share(self, x_TD: torch.Tensor, weights_TN: torch.Tensor, mask_TN: torch.Tensor, bank: ExpertBank,
                  path: str, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's own experts on its tokens, in place (their columns of the weights select the
        pairs); ``add_to`` (the returned deltas, when ``plan.fused``) is added inside the matmul."""
        with self.counters.span("expert_compute", x_TD.device):
            L = bank.num_experts
            m_TL = local_columns(mask_TN, self.my_rank, L)
            return bank(x_TD, local_columns(weights_TN, self.my_rank, L), m_TL, resolve_path(path, m_TL, bank), add_to)

    def combine(self, local_TO: torch.Tensor, returned_SO: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """The own share plus every returned delta added to its token, in fp32 (at least)."""
        with self.counters.span("combine", local_TO.device):
            return add_returned_rows(local_TO, returned_SO, plan.permute, plan.once)

    # -- the schedule ----------------------------------------------------------------------------
    @torch.compiler.disable  # the all-to-alls stay outside compiled code (--compile): a graph break here
    def __call__(self, x_TD, weights_TN, mask_TN, bank: ExpertBank, path):
        return self.run(self.plan(mask_TN, x_TD, bank), x_TD, weights_TN, mask_TN, bank, path)

    def run(self, plan: ExchangePlan, x_TD, weights_TN, mask_TN, bank: ExpertBank, path):
        """Every phase after ``plan``: dispatch, the exchanges and expert compute by the schedule, combine."""
        sent = self.dispatch(x_TD, weights_TN, mask_TN, plan)
        schedule = self._overlapped if self.overlap else self._waited
        return schedule(x_TD, weights_TN, mask_TN, sent, plan, bank, path)

    def _waited(self, x_TD, weights_TN, mask_TN, sent, plan: ExchangePlan, bank: ExpertBank, path):
        """Each exchange waited for, then the own share on all tokens, whole (a slice's backward
        would write a zero-filled copy of x's gradient), adding the returned deltas when fused."""
        ex, (rows_SD, cols_SL) = self.exchange, sent
        rows_VD = ex.all_to_all(rows_SD, plan.recv, plan.send, min_bytes=plan.rows_min)
        cols_VL = ex.all_to_all(cols_SL, plan.recv, plan.send, min_bytes=ROUTING_MIN)
        y_VO = self.expert_compute(rows_VD.to(plan.activations), cols_VL, bank, path)
        y_SO = ex.all_to_all(y_VO.to(plan.deltas_wire), plan.send, plan.recv, min_bytes=plan.deltas_min)
        if plan.fused:  # the returned deltas line up with the tokens: added as the own share writes its delta
            return self.own_share(x_TD, weights_TN, mask_TN, bank, path, add_to=y_SO.to(bank.lora_A.dtype))
        return self.combine(self.own_share(x_TD, weights_TN, mask_TN, bank, path), y_SO, plan)

    def _overlapped(self, x_TD, weights_TN, mask_TN, sent, plan: ExchangePlan, bank: ExpertBank, path):
        """The same phases with each exchange launched and landed: the own share runs in two halves of
        the tokens, the first while the rows travel out, the second while the deltas travel back. In
        the backward autograd reaches them in the same places (later-created nodes first), between
        each gradient exchange's launch and its landing. Never fused: the second half runs before the
        deltas land, and fusing them into it would mean waiting for them first (no overlap left for
        the return trip); the sum after it is what the waited schedule does when not fused."""
        ex, (rows_SD, cols_SL), T = self.exchange, sent, x_TD.shape[0]
        # split, not sliced: x's gradient is then one concatenation of the halves' gradients,
        # where two slices would each write a zero-filled copy of x and sum them
        (x1, x2), (w1, w2), (m1, m2) = (t.split([T // 2, T - T // 2]) for t in (x_TD, weights_TN, mask_TN))
        rows_out = ex.launch(rows_SD, plan.recv, plan.send, min_bytes=plan.rows_min)
        cols_out = ex.launch(cols_SL, plan.recv, plan.send, min_bytes=ROUTING_MIN)
        local_first = self.own_share(x1, w1, m1, bank, path)
        rows_VD, cols_VL = ex.land(rows_out), ex.land(cols_out)
        y_VO = self.expert_compute(rows_VD.to(plan.activations), cols_VL, bank, path)
        back = ex.launch(y_VO.to(plan.deltas_wire), plan.send, plan.recv, min_bytes=plan.deltas_min)
        local_TO = torch.cat([local_first, self.own_share(x2, w2, m2, bank, path)])
        return self.combine(local_TO, ex.land(back), plan)
