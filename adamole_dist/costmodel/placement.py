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
* expert parallel (ep_size J, L = N/J experts per rank): the own share computes in place on all T
  tokens, the S rows received on the L local experts; the exchanges and the dispatch's copies are
  what the real dispatcher does, read from a dry run of it (dry_run.py: each all-to-all's bytes in
  both passes, the rows, the bytes its gathers, casts, routing columns, combine and their backward
  write), each exchange priced by the all-to-all model. With overlap, the exposed part of each trip
  shrinks by ``overlap`` x the own-share compute that runs while it travels (half the tokens per
  trip, forward 1/3 and backward 2/3 of the compute). Expert gradients are all-reduced over the W/J
  replicas holding the same experts.

No ZeRO-sharded placement is predicted: the trainer keeps the experts outside DeepSpeed's engine
(docs/zero3_experts.md), so it never runs one.

For LoRA experts a token is large (D values) against the expert's work (2 D r per expert), so
shipping it usually costs more than all-reducing the tiny gradients: with Llama-7B shapes, 8
experts x r=4 on q,k,v,o have 134 MB of fp32 gradients per step, against GBs of token traffic
at 4k tokens per rank. Expert parallelism wins with few tokens and large experts, or under a
memory budget that replicated experts exceed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adamole_dist.costmodel.dry_run import DispatchTraffic, dispatch_traffic
from adamole_dist.moe.experts import DENSE_ONLY_TOTAL_RANK, choose_compute_path


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


ACTIVATION_DTYPES = {2: torch.bfloat16, 4: torch.float32}  # Workload.act_bytes / wire_bytes -> the dry run's dtype


def layer_traffic(w: Workload, J: int, d_in: int, d_out: int) -> DispatchTraffic:
    """What the real dispatcher moves for one of ``w``'s layers at EP size ``J`` (dry_run.py)."""
    act = ACTIVATION_DTYPES.get(w.act_bytes, torch.float32)
    wire = ACTIVATION_DTYPES.get(w.wire) if w.wire < w.act_bytes else None
    return dispatch_traffic(w.tokens_per_rank, d_in, d_out, w.num_experts, w.rank, J, w.avg_active, act, wire,
                            w.overlap)


def predict_expert_parallel(w: Workload, J: int, comm: CommModel, comp: ComputeModel) -> Prediction:
    T, N, r = w.tokens_per_rank, w.num_experts, w.rank
    L = N // J
    own_active = w.avg_active * L / N
    experts = copies = a2a = hidden = sent = 0.0
    traffic = None
    for D, O in w.layers:
        traffic = layer_traffic(w, J, D, O)
        S = traffic.rows_sent  # rows out per rank; by symmetry as many come in
        own = comp.experts_s(T, L, r, own_active, D, O)
        experts += own + comp.experts_s(S, L, r, traffic.remote_pairs / S if S else 0.0, D, O)
        # the dispatch's own copies, and x's gradient from the router added to the experts' (the layer's)
        copies += (traffic.copy_bytes + T * D * w.act_bytes) * comp.copy_s_per_byte
        fwd = [comm.all_to_all(b, J) for b in traffic.exchanges_fwd]
        bwd = [comm.all_to_all(b, J) for b in traffic.exchanges_bwd]
        a2a += comm.all_to_all(traffic.count_bytes, J) + sum(fwd) + sum(bwd)
        sent += traffic.bytes_sent
        if w.overlap and fwd and bwd:
            # half the own share runs while each trip travels: in the forward (1/3 of the compute) the
            # rows out and the deltas back (the last exchange), in the backward (2/3) the deltas'
            # gradients out (the first) and the rows' back
            trips = ((sum(fwd[:-1]), 1 / 3), (fwd[-1], 1 / 3), (bwd[0], 2 / 3), (sum(bwd[1:]), 2 / 3))
            hidden += comp.overlap * sum(min(t, own * part / 2) for t, part in trips)
    grad = w.expert_param_count * w.grad_bytes / J
    flatten = 2 * grad * comp.copy_s_per_byte
    # the bank runs twice per layer (own share, received rows; three times with overlap's halves),
    # and each run writes its weights' full gradients
    calls = 3 if w.overlap else 2
    optimizer = w.expert_param_count / J * (comp.optimizer_s_per_param + calls * comp.layer_s_per_param)
    reduce = comm.all_reduce(grad, w.world_size // J, stride=J)
    fixed = len(w.layers) * comp.dispatch_fixed_s
    return Prediction("expert_parallel", J, experts + copies + flatten + optimizer + fixed, a2a - hidden + reduce,
                      {"route_s": route_s(w, comp), "experts_s": experts, "copy_s": copies + flatten,
                       "optimizer_s": optimizer, "dispatch_fixed_s": fixed,
                       "a2a_s": a2a, "hidden_s": hidden, "grad_allreduce_s": reduce,
                       "a2a_bytes_sent": sent, "grad_allreduce_bytes": grad,
                       "rows_sent": traffic.rows_sent if traffic else 0.0,
                       "send_all": traffic.send_all if traffic else False})


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
