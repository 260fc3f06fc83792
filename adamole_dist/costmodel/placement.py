"""Placement cost model for LoRA experts: replicated (data parallel) or expert parallel.

It predicts the expert-related part of one training step per rank — everything else (the frozen
base, attention, ZeRO-3 gathers of the base) is the same whatever the placement — from:

* an alpha-beta model of communication: a collective costs its message latencies plus its bytes
  over the bandwidth; intra- and inter-node links differ; all-to-all has its own alpha and beta
  (measured: gloo's runs pairwise, one peer after another, so its time is the SUM over peers);
* measured compute rates (calibration.py): the experts' dense and grouped paths, the router, and
  elementwise copies per byte (the dispatch's gathers, casts and combines, and the fresh buffers
  they write into).

Per adapted layer (D in, O out), T tokens per rank, N experts of rank r, a active per token:

* replicated: the router, every expert on the rank's tokens, and one all-reduce of all expert
  gradients over the world (ring: 2 (p-1)/p bytes / beta + 2 (p-1) alpha).
* expert parallel (ep_size J, L = N/J experts per rank): each token goes once to every OTHER rank
  of its group that owns one of its kept experts (probability q per rank; all tokens when one
  other rank needs >= SEND_ALL_FRACTION of them, as with 2 ranks and dense routing), with its
  routing columns (L fp32 values). The own share computes in place on all T tokens; the S rows
  received compute on the L local experts. Seven all-to-alls: counts, rows, routing columns and
  deltas back in the forward; the deltas', rows' and columns' gradients in the backward. The
  copies each pass makes (dispatch/ep_dispatcher.py): gather (none when every token goes), casts
  to and from a narrower wire, the combine, and their backward. With overlap, the exposed part of
  each exchange shrinks by ``overlap`` x the own-share compute that runs while it travels (half
  the tokens per exchange pair, forward 1/3 and backward 2/3 of the compute), and the halves'
  deltas and x's gradients are concatenated (two more copies). Expert gradients are
  all-reduced over the W/J replicas holding the same experts.

No ZeRO-sharded placement is predicted: the trainer keeps the experts outside DeepSpeed's engine
(docs/zero3_experts.md), so it never runs one.

For LoRA experts a token is large (D values) against the expert's work (2 D r per expert), so
shipping it usually costs more than all-reducing the tiny gradients: with Llama-7B shapes, 8
experts x r=4 on q,k,v,o have 134 MB of fp32 gradients per step, against GBs of token traffic
at 4k tokens per rank. Expert parallelism wins with few tokens and large experts, or under a
memory budget that replicated experts exceed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adamole_dist.moe.experts import DENSE_ONLY_TOTAL_RANK, choose_compute_path
from adamole_dist.moe.permute import SEND_ALL_FRACTION

ROUTING_COLUMN_BYTES = 4  # routing columns travel in fp32 (permute.routing_columns)
COUNT_BYTES = 16  # the count exchange: two int64 per destination


@dataclass
class CommModel:
    """alpha (s per message) and beta (bytes/s) inside a node and across nodes; all-to-all's own
    alpha and beta relative to those (measured: gloo's all-to-all is not the all-reduce's ring)."""

    alpha_intra: float = 5e-6
    beta_intra: float = 100e9
    alpha_inter: float = 20e-6
    beta_inter: float = 12.5e9
    ranks_per_node: int = 8
    a2a_beta_scale: float = 1.0
    a2a_alpha_scale: float = 1.0

    def link(self, spans_nodes: bool) -> tuple[float, float]:
        return (self.alpha_inter, self.beta_inter) if spans_nodes else (self.alpha_intra, self.beta_intra)

    def _spans(self, group_size: int, stride: int = 1) -> bool:
        return group_size * stride > self.ranks_per_node

    def all_reduce(self, nbytes: float, p: int, stride: int = 1) -> float:
        if p <= 1:
            return 0.0
        a, b = self.link(self._spans(p, stride))
        return 2 * (p - 1) / p * nbytes / b + 2 * (p - 1) * a

    def all_gather(self, nbytes_total: float, p: int) -> float:
        if p <= 1:
            return 0.0
        a, b = self.link(self._spans(p))
        return (p - 1) / p * nbytes_total / b + (p - 1) * a

    def all_to_all(self, nbytes_sent: float, p: int) -> float:
        """One rank sends nbytes_sent in all to the p-1 others (and receives as much), one peer
        after another: p-1 latencies plus the bytes over the bandwidth."""
        if p <= 1:
            return 0.0
        a, b = self.link(self._spans(p))
        return nbytes_sent / (b * self.a2a_beta_scale) + (p - 1) * a * self.a2a_alpha_scale


@dataclass
class ComputeModel:
    """Measured rates (calibration.py). Units, all forward + backward: token x rank column x (D + O)
    for the experts' dense path (x A^T and h B), active (token, expert) pair x (D + O) for the
    grouped path (the pair's row gathered, its delta scattered), token x column x D for the router
    (one linear); per expert parameter for the expert optimizer (norm, clip, AdamW) and for what a
    layer costs whatever its tokens (its weight gradients written); per layer for the expert-parallel
    dispatch's host work (planning, count syncs, small ops) besides its exchanges."""

    dense_s_per_unit: float = 2e-13
    grouped_s_per_unit: float = 1e-11
    route_s_per_unit: float = 2e-13
    copy_s_per_byte: float = 1e-10  # an elementwise op, per byte it writes (a fresh buffer included)
    optimizer_s_per_param: float = 1e-9
    layer_s_per_param: float = 0.0  # per step and expert parameter whatever the tokens (its gradient written)
    dispatch_fixed_s: float = 0.0  # per layer and step: the EP dispatch's host work besides latencies and bytes
    overlap: float = 1.0  # the fraction of an exchange hidden behind compute running meanwhile

    def experts_s(self, tokens: float, num_experts: int, rank: int, active: float, d_in: int, d_out: int) -> float:
        """A bank of ``num_experts`` on ``tokens``, ``active`` of them per token, by the path the
        dispatch takes (moe/experts.py: dense for small banks, else choose_compute_path)."""
        if num_experts * rank > DENSE_ONLY_TOTAL_RANK and choose_compute_path(num_experts, rank, active) == "grouped":
            return tokens * active * (d_in + d_out) * self.grouped_s_per_unit
        return tokens * num_experts * rank * (d_in + d_out) * self.dense_s_per_unit


@dataclass
class Workload:
    layers: list[tuple[int, int]]  # (d_in, d_out) of every adapted linear
    num_experts: int
    rank: int
    tokens_per_rank: int
    avg_active: float  # active experts per token
    world_size: int
    act_bytes: int = 2  # activations' element size (bf16 on GPU, fp32 on CPU)
    grad_bytes: int = 4  # expert gradients (fp32)
    wire_bytes: int | None = None  # --dispatch_dtype's element size; None = act_bytes
    overlap: bool = False  # --ep_overlap resolved

    @property
    def expert_param_count(self) -> int:
        return sum(self.num_experts * self.rank * (i + o) for i, o in self.layers)

    @property
    def wire(self) -> int:
        return min(self.wire_bytes or self.act_bytes, self.act_bytes)


@dataclass
class Prediction:
    placement: str
    ep_size: int
    compute_s: float
    comm_s: float
    detail: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def step_s(self) -> float:
        """The expert part plus the router: a step of the dispatch benchmark's layer."""
        return self.total_s + self.detail.get("route_s", 0.0)


def destination_fraction(avg_active: float, num_experts: int, ep_size: int) -> float:
    """Probability that a token needs a given rank of its EP group, experts chosen uniformly: for a
    whole number k of them (top-k) 1 - C(N-L, k) / C(N, k) with L = N/J per rank, else (threshold
    methods, each expert on its own with probability a/N) 1 - (1 - a/N)^L."""
    per_rank = num_experts // ep_size
    k = round(avg_active)
    if abs(avg_active - k) < 1e-6 and 0 <= k <= num_experts:
        return 1.0 - math.comb(num_experts - per_rank, k) / math.comb(num_experts, k)
    p_expert = min(max(avg_active / num_experts, 0.0), 1.0)
    return 1.0 - (1.0 - p_expert) ** per_rank


def route_s(w: Workload, comp: ComputeModel) -> float:
    """The router (and AdaMoLE's threshold column) of every layer: the same for every placement."""
    return sum(w.tokens_per_rank * (w.num_experts + 1) * i for i, _ in w.layers) * comp.route_s_per_unit


def predict_replicated(w: Workload, comm: CommModel, comp: ComputeModel) -> Prediction:
    T, N = w.tokens_per_rank, w.num_experts
    experts = sum(comp.experts_s(T, N, w.rank, w.avg_active, i, o) for i, o in w.layers)
    grad = w.expert_param_count * w.grad_bytes
    # x's gradient from the router and from the experts summed; the expert gradients into one flat
    # buffer and back (expert_optimizer.py)
    copies = (sum(T * i * w.act_bytes for i, _ in w.layers) + 2 * grad) * comp.copy_s_per_byte
    optimizer = w.expert_param_count * (comp.optimizer_s_per_param + comp.layer_s_per_param)
    reduce = comm.all_reduce(grad, w.world_size)
    return Prediction("replicated", 1, experts + copies + optimizer, reduce,
                      {"route_s": route_s(w, comp), "experts_s": experts, "copy_s": copies, "optimizer_s": optimizer,
                       "a2a_s": 0.0,
                       "grad_allreduce_s": reduce, "grad_allreduce_bytes": grad})


def rows_sent(w: Workload, J: int) -> tuple[float, bool]:
    """(rows one rank sends to the other ranks of its group per layer, whether every token goes)."""
    q = destination_fraction(w.avg_active, w.num_experts, J)
    send_all = J == 2 and q >= SEND_ALL_FRACTION
    return (w.tokens_per_rank if send_all else w.tokens_per_rank * q * (J - 1)), send_all


def predict_expert_parallel(w: Workload, J: int, comm: CommModel, comp: ComputeModel) -> Prediction:
    T, N, r = w.tokens_per_rank, w.num_experts, w.rank
    L = N // J
    S, send_all = rows_sent(w, J)  # rows out per rank; by symmetry as many come in
    q = destination_fraction(w.avg_active, N, J)
    ab, wb, cb = w.act_bytes, w.wire, ROUTING_COLUMN_BYTES
    narrow = wb < ab
    own_active = w.avg_active * L / N
    remote_active = own_active / max(q, 1e-9) if not send_all else own_active
    experts = copies = a2a = hidden = 0.0
    for D, O in w.layers:
        own = comp.experts_s(T, L, r, own_active, D, O)
        experts += own + comp.experts_s(S, L, r, remote_active, D, O)
        moved = 0.0  # bytes the dispatch's elementwise ops write, forward and backward
        moved += 0 if send_all else S * D * ab  # gather the rows (bwd: zero-filled index_add below)
        moved += 2 * S * D * (wb + ab) if narrow else 0  # rows to the wire and back, in both passes
        moved += 2 * S * O * (wb + ab) if narrow else 0  # deltas to the wire and back, in both passes
        moved += 6 * S * L * cb  # routing columns: indexed, masked, split (fwd), their grads (bwd)
        # combine: sum, or index_add (a copy); without overlap, when every token went, the own share's
        # matmul adds the deltas as it writes (ep_dispatcher.fused_combine), measured about as dear
        moved += T * O * ab + (0 if send_all else S * O * ab)
        if w.overlap:  # the own share in two halves: their deltas concatenated, x's gradient too (bwd)
            moved += T * O * ab + T * D * ab
        moved += 0 if send_all else S * O * ab  # combine's backward: the returned rows' gradient
        # x's gradient: router + own share + the rows' (a zero-filled index_add unless every token went)
        moved += 2 * T * D * ab + (0 if send_all else T * D * ab + S * D * ab)
        copies += moved * comp.copy_s_per_byte
        rows, cols, deltas = S * D * wb, S * L * cb, S * O * wb
        fwd_out, fwd_back = comm.all_to_all(rows, J) + comm.all_to_all(cols, J), comm.all_to_all(deltas, J)
        a2a += comm.all_to_all(COUNT_BYTES * J, J) + 2 * (fwd_out + fwd_back)  # bwd: the same bytes again
        if w.overlap:  # half the own share runs while each exchange pair travels, fwd (1/3) and bwd (2/3)
            hidden += comp.overlap * sum(min(t, own * part / 2) for t in (fwd_out, fwd_back) for part in (1 / 3, 2 / 3))
    grad = w.expert_param_count * w.grad_bytes / J
    flatten = 2 * grad * comp.copy_s_per_byte
    # the bank runs twice per layer (own share, received rows; three times with overlap's halves),
    # and each run writes its weights' full gradients
    calls = 3 if w.overlap else 2
    optimizer = w.expert_param_count / J * (comp.optimizer_s_per_param + calls * comp.layer_s_per_param)
    reduce = comm.all_reduce(grad, w.world_size // J, stride=J)
    sent = sum(2 * S * (D * wb + L * cb + O * wb) for D, O in w.layers)
    fixed = len(w.layers) * comp.dispatch_fixed_s
    return Prediction("expert_parallel", J, experts + copies + flatten + optimizer + fixed, a2a - hidden + reduce,
                      {"route_s": route_s(w, comp), "experts_s": experts, "copy_s": copies + flatten,
                       "optimizer_s": optimizer, "dispatch_fixed_s": fixed,
                       "a2a_s": a2a, "hidden_s": hidden, "grad_allreduce_s": reduce,
                       "a2a_bytes_sent": sent, "grad_allreduce_bytes": grad, "dest_fraction": q,
                       "rows_sent": S, "send_all": send_all})


def candidate_ep_sizes(world_size: int, num_experts: int) -> list[int]:
    return [j for j in range(2, world_size + 1) if world_size % j == 0 and num_experts % j == 0]


def predict_all(w: Workload, comm: CommModel, comp: ComputeModel) -> list[Prediction]:
    preds = [predict_replicated(w, comm, comp)]
    preds += [predict_expert_parallel(w, j, comm, comp) for j in candidate_ep_sizes(w.world_size, w.num_experts)]
    return preds


def predict_placement(w: Workload, ep_size: int, comm: CommModel, comp: ComputeModel) -> Prediction:
    """Replicated for ep_size 1, else expert parallel over ``ep_size``."""
    return predict_replicated(w, comm, comp) if ep_size <= 1 else predict_expert_parallel(w, ep_size, comm, comp)


def expert_memory_bytes(w: Workload, ep_size: int) -> float:
    """Expert parameters, gradients and two AdamW moments per rank (4x the parameter bytes)."""
    return 4 * w.expert_param_count * w.grad_bytes / ep_size


def choose_ep_size(w: Workload, comm: CommModel, comp: ComputeModel,
                   expert_memory_budget_bytes: float | None = None) -> tuple[int, list[Prediction], str]:
    """The cheapest runnable placement (replicated = ep_size 1, or an EP size) and why.

    Placements whose experts exceed the memory budget are excluded (the smallest one is taken
    when none fits)."""
    preds = predict_all(w, comm, comp)
    for p in preds:
        p.detail["expert_memory_bytes"] = expert_memory_bytes(w, p.ep_size)
    runnable = [p for p in preds if expert_memory_budget_bytes is None
                or p.detail["expert_memory_bytes"] <= expert_memory_budget_bytes]
    if not runnable:
        runnable = [min(preds, key=lambda p: p.detail["expert_memory_bytes"])]
    best = min(runnable, key=lambda p: p.total_s)
    table = "; ".join(f"{p.placement}{'' if p.placement != 'expert_parallel' else f'(ep={p.ep_size})'} "
                      f"{1000 * p.total_s:.1f} ms" for p in preds)
    why = (f"ep_size {best.ep_size} ({best.placement}) predicted cheapest for the experts: {table}")
    return best.ep_size, preds, why


def adapter_workload(layers: list[tuple[int, int]], cfg, tokens_per_rank: int, world_size: int,
                     avg_active: float | None = None, act_bytes: int = 4, wire_bytes: int | None = None,
                     overlap: bool = False) -> Workload:
    """The expert part of one step for adapted layers of (d_in, d_out) under AdapterConfig ``cfg``;
    ``avg_active`` measured if known, else what the method implies (cfg.expected_active_experts)."""
    return Workload(layers=layers, num_experts=cfg.num_experts, rank=cfg.rank, tokens_per_rank=tokens_per_rank,
                    avg_active=cfg.expected_active_experts if avg_active is None else avg_active,
                    world_size=world_size, act_bytes=act_bytes, wire_bytes=wire_bytes, overlap=overlap)
