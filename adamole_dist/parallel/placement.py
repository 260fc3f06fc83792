"""Placement cost model for LoRA experts: replicated (data parallel), expert parallel, ZeRO-sharded.

An alpha-beta model of communication (a collective costs its message latencies plus its
bytes over the bandwidth; intra- and inter-node links differ) and a measured per-unit cost of
the expert compute. It predicts the expert-related part of one training step (everything
else — the frozen base, attention, ZeRO-3 gathers of the base — is the same whatever the
placement):

* replicated: every rank computes all N experts on its own tokens, then all-reduces the
  expert gradients over the world (ring: 2 (p-1)/p bytes / beta + 2 (p-1) alpha).
* expert parallel (ep_size J): each token travels once to every remote rank of its EP group
  that owns one of its active experts and back, in the forward and the backward pass (four
  all-to-alls of rows per adapted layer, plus one of row counts); each rank computes its N/J experts on what it receives;
  expert gradients are all-reduced over the W/J expert-data-parallel replicas.
* ZeRO-sharded: experts partitioned over all ranks like ZeRO-3 parameters: compute as
  replicated, plus per layer an all-gather of its experts in the forward and again in the
  backward pass and a reduce-scatter of their gradients.

For LoRA experts, tokens are large (D values) against the expert's work (2 D r per expert),
so shipping them usually costs far more than all-reducing the tiny gradients: with Llama-7B
shapes, 8 experts x r=4 on q,k,v,o have 134 MB of fp32 gradients per step, against many GB
of token traffic at 4k tokens per rank. The model makes that trade explicit and picks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class CommModel:
    """alpha (s per message) and beta (bytes/s) inside a node and across nodes."""

    alpha_intra: float = 5e-6
    beta_intra: float = 100e9
    alpha_inter: float = 20e-6
    beta_inter: float = 12.5e9
    ranks_per_node: int = 8
    a2a_beta_scale: float = 1.0  # all-to-all bandwidth relative to the all-reduce bandwidth (measured)

    def link(self, group_size: int, spans_nodes: bool) -> tuple[float, float]:
        return (self.alpha_inter, self.beta_inter) if spans_nodes else (self.alpha_intra, self.beta_intra)

    def _spans(self, group_size: int, stride: int = 1) -> bool:
        return group_size * stride > self.ranks_per_node

    def all_reduce(self, nbytes: float, p: int, stride: int = 1) -> float:
        if p <= 1:
            return 0.0
        a, b = self.link(p, self._spans(p, stride))
        return 2 * (p - 1) / p * nbytes / b + 2 * (p - 1) * a

    def all_gather(self, nbytes_total: float, p: int) -> float:
        if p <= 1:
            return 0.0
        a, b = self.link(p, self._spans(p))
        return (p - 1) / p * nbytes_total / b + (p - 1) * a

    def all_to_all(self, nbytes_sent: float, p: int) -> float:
        """One rank sends nbytes_sent to the p-1 others (and receives as much)."""
        if p <= 1:
            return 0.0
        a, b = self.link(p, self._spans(p))
        return nbytes_sent / (b * self.a2a_beta_scale) + (p - 1) * a


@dataclass
class ComputeModel:
    """Seconds per unit of dense expert work (token x expert-rank column x (d_in + d_out)), fwd+bwd,
    and per byte moved by the local permute/unpermute of expert parallelism."""

    dense_s_per_unit: float = 2e-13
    permute_s_per_byte: float = 1e-10


@dataclass
class Workload:
    layers: list[tuple[int, int]]  # (d_in, d_out) of every adapted linear
    num_experts: int
    rank: int
    tokens_per_rank: int
    avg_active: float  # active experts per token
    world_size: int
    act_bytes: int = 2  # activations on the wire (bf16)
    grad_bytes: int = 4  # expert gradients (fp32)

    @property
    def expert_param_count(self) -> int:
        return sum(self.num_experts * self.rank * (i + o) for i, o in self.layers)


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


def destination_fraction(avg_active: float, num_experts: int, ep_size: int) -> float:
    """Probability that a token needs a given rank of its EP group (experts chosen independently
    and uniformly, avg_active of N): 1 - (1 - a/N)^(N/J)."""
    per_rank = num_experts // ep_size
    p_expert = min(max(avg_active / num_experts, 0.0), 1.0)
    return 1.0 - (1.0 - p_expert) ** per_rank


def predict_replicated(w: Workload, comm: CommModel, comp: ComputeModel) -> Prediction:
    units = sum(w.tokens_per_rank * w.num_experts * w.rank * (i + o) for i, o in w.layers)
    grad = w.expert_param_count * w.grad_bytes
    c = comm.all_reduce(grad, w.world_size)
    return Prediction("replicated", 1, units * comp.dense_s_per_unit, c, {"grad_allreduce_bytes": grad})


def predict_expert_parallel(w: Workload, J: int, comm: CommModel, comp: ComputeModel) -> Prediction:
    q = destination_fraction(w.avg_active, w.num_experts, J)
    rows_remote = w.tokens_per_rank * q * (J - 1)  # rows one rank sends to the others, per layer
    compute = sum(w.tokens_per_rank * q * w.num_experts * w.rank * (i + o) for i, o in w.layers) \
        * comp.dense_s_per_unit
    a2a, sent = 0.0, 0.0
    for i, o in w.layers:
        fwd = rows_remote * (i + 2 * w.num_experts / J) * w.act_bytes  # x plus weights and mask bits
        back = rows_remote * o * w.act_bytes
        # forward: count exchange + rows out + results back; backward: the two row exchanges again
        a2a += comm.all_to_all(8 * J, J) + 2 * (comm.all_to_all(fwd, J) + comm.all_to_all(back, J))
        sent += 2 * (fwd + back)
        compute += 2 * (fwd + back) * comp.permute_s_per_byte
    grad = w.expert_param_count * w.grad_bytes / J
    reduce = comm.all_reduce(grad, w.world_size // J, stride=J)
    return Prediction("expert_parallel", J, compute, a2a + reduce,
                      {"a2a_bytes_sent": sent, "a2a_s": a2a, "grad_allreduce_bytes": grad, "dest_fraction": q})


def predict_zero_sharded(w: Workload, comm: CommModel, comp: ComputeModel) -> Prediction:
    base = predict_replicated(w, comm, comp)
    c = 0.0
    for i, o in w.layers:
        layer_bytes = w.num_experts * w.rank * (i + o) * w.grad_bytes
        c += 3 * comm.all_gather(layer_bytes, w.world_size)  # gather fwd, gather bwd, reduce-scatter grads
    return Prediction("zero_sharded", 1, base.compute_s, c, {"gathers_per_layer": 2, "reduce_scatters_per_layer": 1})


def candidate_ep_sizes(world_size: int, num_experts: int) -> list[int]:
    return [j for j in range(2, world_size + 1) if world_size % j == 0 and num_experts % j == 0]


def predict_all(w: Workload, comm: CommModel, comp: ComputeModel) -> list[Prediction]:
    preds = [predict_replicated(w, comm, comp), predict_zero_sharded(w, comm, comp)]
    preds += [predict_expert_parallel(w, j, comm, comp) for j in candidate_ep_sizes(w.world_size, w.num_experts)]
    return preds


def choose_ep_size(w: Workload, comm: CommModel, comp: ComputeModel,
                   expert_memory_budget_bytes: float | None = None) -> tuple[int, list[Prediction], str]:
    """The cheapest runnable placement (replicated = ep_size 1, or an EP size) and why.

    ZeRO-sharded experts are predicted for comparison; the trainer runs replicated or EP.
    Replicated experts need params + grads + two AdamW moments per rank (4x param bytes);
    placements over the memory budget are excluded."""
    preds = predict_all(w, comm, comp)
    runnable = []
    for p in preds:
        if p.placement == "zero_sharded":
            continue
        mem = 4 * w.expert_param_count * w.grad_bytes / p.ep_size
        p.detail["expert_memory_bytes"] = mem
        if expert_memory_budget_bytes is None or mem <= expert_memory_budget_bytes:
            runnable.append(p)
    if not runnable:
        runnable = [min((p for p in preds if p.placement != "zero_sharded"), key=lambda p: p.detail["expert_memory_bytes"])]
    best = min(runnable, key=lambda p: p.total_s)
    table = "; ".join(f"{p.placement}{'' if p.placement != 'expert_parallel' else f'(ep={p.ep_size})'} "
                      f"{1000 * p.total_s:.1f} ms" for p in preds)
    why = (f"ep_size {best.ep_size} ({best.placement}) predicted cheapest for the experts: {table}")
    return best.ep_size, preds, why


def adapter_workload(layers: list[tuple[int, int]], cfg, tokens_per_rank: int, world_size: int,
                     avg_active: float | None = None, act_bytes: int = 4) -> Workload:
    """The expert part of one step for adapted layers of (d_in, d_out) under AdapterConfig ``cfg``;
    ``avg_active`` measured if known, else what the method implies (cfg.expected_active_experts)."""
    return Workload(layers=layers, num_experts=cfg.num_experts, rank=cfg.rank, tokens_per_rank=tokens_per_rank,
                    avg_active=cfg.expected_active_experts if avg_active is None else avg_active,
                    world_size=world_size, act_bytes=act_bytes)


def calibrate(w: Workload, device, max_tokens: int = 2048) -> tuple[CommModel, ComputeModel]:
    """Measure this machine for ``w``: compute on this rank (at most ``max_tokens`` tokens), and
    alpha/beta over the world when there is more than one rank (collective: every rank calls it)."""
    comm = measure_comm(device=device) if w.world_size > 1 else CommModel()  # one rank: nothing to price
    comp = measure_compute(d=w.layers[0][0], tokens=min(w.tokens_per_rank, max_tokens), num_experts=w.num_experts,
                           rank=w.rank)
    return comm, comp


# -- calibration on this machine -------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples[1:])[len(samples[1:]) // 2]


def measure_compute(d: int = 1024, tokens: int = 2048, num_experts: int = 8, rank: int = 4, repeats: int = 5) -> ComputeModel:
    """Time the dense expert path and the expert-parallel permute/combine (fwd+bwd) on this machine."""
    import torch

    from adamole_dist.moe.experts import dense_expert_delta
    from adamole_dist.moe.permute import combine, gather_rows, plan_dispatch

    x = torch.randn(tokens, d, requires_grad=True)
    A = torch.randn(num_experts, rank, d, requires_grad=True)
    B = torch.randn(num_experts, rank, d, requires_grad=True)
    w = torch.rand(tokens, num_experts, requires_grad=True)
    dense = _median_time(lambda: dense_expert_delta(x, w, A, B, 2.0).sum().backward(), repeats)
    kept = torch.rand(tokens, num_experts) < 0.5
    plan = plan_dispatch(kept, 2)
    rows = int(plan.send_counts_J.sum())

    def permute_round_trip():  # the general path: gather the rows, add the returned ones (fwd + bwd)
        sent_SD = gather_rows(x, plan, every_token_once=False)
        combine(x, sent_SD, plan, every_token_once=False).sum().backward()

    permute = _median_time(permute_round_trip, repeats)
    return ComputeModel(dense_s_per_unit=dense / (tokens * num_experts * rank * 2 * d),
                        permute_s_per_byte=permute / (2 * rows * 2 * d * 4))


def measure_comm(group=None, ranks_per_node: int | None = None, large: int = 4 << 20, repeats: int = 5,
                 device=None) -> CommModel:
    """alpha from a 1-element all-reduce, beta from a large one (ring formula inverted), and the
    all-to-all bandwidth from a large all_to_all_single, with tensors on ``device`` (the training
    device: CUDA under NCCL). Collective: every rank of the group calls it."""
    import torch

    from adamole_dist.parallel import collectives

    device = torch.device(device or "cpu")
    p = collectives.world_size(group)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(op) -> float:
        def run():
            collectives.barrier(group)
            op()
            sync()
        return _median_time(run, repeats) - _median_time(lambda: collectives.barrier(group), repeats)

    small_t = torch.zeros(1, device=device)
    big_t = torch.zeros(large // 4, device=device)
    t_small = max(timed(lambda: collectives.all_reduce_sum(small_t, group)), 1e-7)
    t_large = timed(lambda: collectives.all_reduce_sum(big_t, group))
    alpha = t_small / max(2 * (p - 1), 1)
    beta = (2 * (p - 1) / p * large) / max(t_large - 2 * (p - 1) * alpha, 1e-9)
    out = torch.empty_like(big_t)
    t_a2a = timed(lambda: collectives.all_to_all_single(out, big_t, group=group))
    sent = large * (p - 1) / p
    a2a_beta = sent / max(t_a2a - (p - 1) * alpha, 1e-9)
    rpn = ranks_per_node or p
    return CommModel(alpha_intra=alpha, beta_intra=beta, alpha_inter=alpha, beta_inter=beta, ranks_per_node=rpn,
                     a2a_beta_scale=a2a_beta / beta)
