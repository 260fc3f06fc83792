"""Calibrate the placement cost model (placement.py) on this machine and this job's group.

Everything is measured at the workload's own sizes (its hidden size, its tokens per rank up to
``max_tokens``, its rows per exchange), because per-byte and per-flop rates on a CPU change with
size (caches, and whether a fresh buffer is page-faulted: ops/host_memory.py). Timings are
medians; collective ones subtract a barrier's own time. Every rank of the group must call
``measure_comm`` (and ``calibrate`` with more than one rank) together.
"""

from __future__ import annotations

import torch

from adamole_dist.costmodel.placement import CommModel, ComputeModel, Workload, choose_ep_size, layer_traffic
from adamole_dist.parallel import all_to_all, collectives
from adamole_dist.parallel.device_timer import wall_seconds


def median_time(fn, repeats: int, device: torch.device = torch.device("cpu"), before=None, q: float = 0.5) -> float:
    """Median (or the ``q`` quantile) seconds of ``fn`` over ``repeats`` calls after one warm-up
    call (``before()`` runs untimed ahead of each)."""
    samples = []
    for _ in range(repeats + 1):
        if before is not None:
            before()
        samples.append(wall_seconds(fn, device))
    return sorted(samples[1:])[int(q * (len(samples) - 2) + 0.5)]


def measure_compute(d_in: int, d_out: int, tokens: int, adapter, bank_experts: int | None = None, repeats: int = 9,
                    device=None, dtype: torch.dtype = torch.float32, group=None) -> ComputeModel:
    """The job's own modules at its shapes, forward and backward: the router of ``adapter`` (an
    AdapterConfig: method, experts, aux loss) on ``tokens`` tokens, an expert bank of
    ``bank_experts`` experts (default: all; expert parallelism runs N/J per rank) on the dense
    path, and an elementwise op into a fresh buffer. With a ``group``, every sample starts after a
    barrier, so the ranks compute side by side as in a step: ranks that share cores or a memory
    bus (and run these matmuls slower side by side than alone: benchmarks/README.md) are
    calibrated as they will run. Collective then: every rank of the group calls it."""
    from adamole_dist.adapters.inject import adapt_linear
    from adamole_dist.moe.experts import ExpertBank

    aligned = (lambda: collectives.barrier(group)) if collectives.is_distributed(group) else None
    device = torch.device(device or "cpu")
    kw = {"device": device, "dtype": dtype}
    layer = adapt_linear(torch.nn.Linear(d_in, d_out, bias=False, **kw).requires_grad_(False), adapter)
    x = torch.randn(tokens, d_in, **kw, requires_grad=True)
    t_route = route_seconds(layer, x, repeats, aligned)
    L = bank_experts or adapter.num_experts
    bank = ExpertBank(L, adapter.rank, d_in, d_out, adapter.scaling, **kw)
    torch.nn.init.normal_(bank.lora_B, std=0.01)
    # Per token: the difference to a handful of tokens, whose cost (the weights' gradients written
    # whatever the tokens) the model prices per parameter (ComputeModel.layer_s_per_param).
    few = min(8, tokens - 1) if tokens > 1 else 0
    per_token = max(tokens - few, 1)

    def per_token_seconds(path: str) -> float:
        return max(bank_seconds(bank, x, tokens, path, repeats, aligned)
                   - (bank_seconds(bank, x, few, path, repeats, aligned) if few else 0.0), 1e-9)

    t_dense, t_grouped = per_token_seconds("dense"), per_token_seconds("grouped")
    a, b = torch.randn(tokens, d_in, **kw), torch.randn(tokens, d_in, **kw)
    t_copy = median_time(lambda: a + b, repeats, device, aligned)
    return ComputeModel(dense_s_per_unit=t_dense / (per_token * L * adapter.rank * (d_in + d_out)),
                        grouped_s_per_unit=t_grouped / (per_token * (d_in + d_out)),
                        route_s_per_unit=t_route / (tokens * (adapter.num_experts + 1) * d_in),
                        copy_s_per_byte=t_copy / a.nbytes,
                        optimizer_s_per_param=measure_optimizer(bank, device, repeats))


def route_seconds(layer, x: torch.Tensor, repeats: int, aligned) -> float:
    """The router of the adapted ``layer`` on the tokens ``x``, forward and backward with its aux loss
    (median)."""
    layer.train()

    def route():
        weights_TN, _ = layer.route(x, None)
        loss = weights_TN.sum() + layer.context.take_aux_loss()
        loss.backward()

    seconds = median_time(route, repeats, x.device, aligned)
    layer.context.pop_stats()
    return seconds


def bank_seconds(bank, x: torch.Tensor, n: int, path: str, repeats: int, aligned) -> float:
    """``bank`` on the first ``n`` tokens of ``x``, forward and backward (median): every expert active on
    the dense path, one active expert per token on the grouped path."""
    L, device, kw = bank.num_experts, x.device, {"device": x.device, "dtype": x.dtype}
    w_nL = torch.rand(n, L, **kw, requires_grad=True)
    if path == "dense":
        m_nL = torch.ones(n, L, dtype=torch.bool, device=device)
    else:
        m_nL = torch.zeros(n, L, dtype=torch.bool, device=device)
        m_nL[torch.arange(n), torch.randint(0, L, (n,))] = True
    g_nO = torch.ones(n, bank.lora_B.shape[-1], **kw)
    x_nD = x[:n].detach().requires_grad_(True)  # a leaf: a slice's backward would add a zero-filled copy of x
    return median_time(lambda: bank(x_nD, w_nL, m_nL, path).backward(g_nO), repeats, device, aligned)


def measure_optimizer(bank, device: torch.device, repeats: int) -> float:
    """Seconds per expert parameter of the expert optimizer's step after the all-reduce: the global
    norm, the clip and AdamW (train/expert_optimizer.py), on ``bank``'s parameters."""
    params = list(bank.parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        norm = torch.sqrt(sum(q.grad.float().pow(2).sum() for q in params))
        for q in params:
            q.grad.mul_(min(1.0, 1.0 / (float(norm) + 1e-6)))
        opt.step()

    return median_time(step, repeats, device) / sum(q.numel() for q in params)


EXCHANGES_PER_LAYER = 7  # placement.py: counts, rows, columns, deltas; and three in the backward


def measure_fixed(adapter, d_in: int, d_out: int, comm: CommModel, group=None, dispatch: bool = True,
                  tokens: int = 8, repeats: int = 9, device=None) -> tuple[float, float]:
    """What a layer costs per step whatever its tokens, from a layer on a handful of them, forward
    and backward: (seconds per expert parameter — the weight gradients written, whatever the
    placement — from all experts on this rank; the expert-parallel dispatch's fixed host work per
    layer — planning, count syncs, small ops — from the whole ``group`` as one EP group, less its
    bank's two runs and its exchanges (latencies, and the bytes it sent: on a slow link even a
    handful of rows takes milliseconds), which placement.py prices; 0 without ``dispatch``).
    Collective: every rank of the group calls it."""
    from adamole_dist.adapters.inject import adapt_linear
    from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
    from adamole_dist.parallel.layout import ParallelLayout
    from adamole_dist.parallel.local_dispatcher import LocalDispatcher

    device = torch.device(device or "cpu")
    p = collectives.world_size(group)
    layout = ParallelLayout(rank=collectives.rank(group), world_size=p, ep_size=p, ep_group=group)
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)

    def layer_time(dispatcher, expert_slice) -> tuple[float, float]:
        """(seconds per step, bytes the dispatcher sent per step)"""
        base = torch.nn.Linear(d_in, d_out, bias=False, device=device).requires_grad_(False)
        layer = adapt_linear(base, adapter, dispatcher=dispatcher, expert_slice=expert_slice)
        layer.train()
        steps = [0]

        def step():
            layer.delta(x).sum().backward()
            layer.context.take_aux_loss()
            steps[0] += 1

        t = timed_collective(step, group, repeats, device)
        layer.context.pop_stats()
        return t, (dispatcher.counters.bytes_sent / steps[0] if dispatcher.counters is not None else 0.0)

    t_local, _ = layer_time(LocalDispatcher(), None)
    per_param = t_local / (adapter.num_experts * adapter.rank * (d_in + d_out))
    if not dispatch or p == 1 or adapter.num_experts % p:
        return per_param, 0.0
    t_ep, sent = layer_time(ExpertParallelDispatcher(layout, overlap=False), layout.expert_slice(adapter.num_experts))
    latencies = EXCHANGES_PER_LAYER * (p - 1) * comm.alpha_intra * comm.a2a_alpha_scale
    exchanges = latencies + comm.all_to_all(sent, p) - comm.all_to_all(0, p)  # + the bytes over beta
    return per_param, dispatch_fixed_cost(t_ep, t_local, adapter.num_experts, p, exchanges)


def dispatch_fixed_cost(t_ep: float, t_local: float, num_experts: int, ep_size: int, exchanges: float) -> float:
    """The EP dispatch's fixed host work per layer from a layer on a handful of tokens: the EP
    layer's time less its bank's two runs (own share and received rows, placement.py), each priced
    like the local layer's bank for its N/J experts, and less its exchanges' modelled time."""
    bank_runs = 2 * t_local * (num_experts // ep_size) / num_experts
    return max(0.0, t_ep - bank_runs - exchanges)


def timed_collective(op, group, repeats: int, device: torch.device, q: float = 0.5) -> float:
    """Median (or the ``q`` quantile) seconds of ``op`` started together on every rank, less a
    barrier's own time (at least 1 ns)."""
    def run():
        collectives.barrier(group)
        op()
    elapsed = (median_time(run, repeats, device, q=q)
               - median_time(lambda: collectives.barrier(group), repeats, device, q=q))
    return max(elapsed, 1e-9)  # a difference of medians: never below zero, whatever the noise


def peer_rows(sent_bytes: int, group, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Rows for an all-to-all like the dispatch's: about ``sent_bytes`` (fp32) from this rank split
    evenly over the OTHER ranks, nothing to itself; (rows, splits)."""
    p, my_rank = collectives.world_size(group), collectives.rank(group)
    per_peer = max(sent_bytes // (4 * max(p - 1, 1)), 1024)
    splits = [0 if j == my_rank else per_peer for j in range(p)]
    return torch.zeros(sum(splits), device=device), splits


def measure_comm(group=None, ranks_per_node: int | None = None, large: int = 4 << 20, a2a_bytes: int | None = None,
                 repeats: int = 9, device=None) -> CommModel:
    """alpha from a 1-element all-reduce, beta from a ``large`` one (ring formula inverted); the
    all-to-all's own alpha (one value per peer) and beta (``a2a_bytes`` sent to the other ranks,
    into a fresh buffer each time, as the dispatch sends and receives). Tensors live on ``device``
    (the training device: CUDA under NCCL)."""
    device = torch.device(device or "cpu")
    p = collectives.world_size(group)

    def timed(op) -> float:
        return timed_collective(op, group, repeats, device)

    def latency(op) -> float:
        # the lower quartile of more samples: a tiny collective costs its latency, or a scheduler
        # tick more when a woken thread waits for a busy core; in runs of such waits the median
        # is the tick, which the dispatch's exchanges, mostly, do not pay
        return max(timed_collective(op, group, max(repeats, 15), device, q=0.25), 1e-7)

    small_t = torch.zeros(1, device=device)
    big_t = torch.zeros(large // 4, device=device)
    t_small = latency(lambda: collectives.all_reduce_sum(small_t, group))
    t_large = timed(lambda: collectives.all_reduce_sum(big_t, group))
    alpha = t_small / max(2 * (p - 1), 1)
    beta = (2 * (p - 1) / p * large) / max(t_large - 2 * (p - 1) * alpha, 1e-9)

    tiny = torch.zeros(p, device=device)
    a2a_alpha = latency(lambda: all_to_all.all_to_all_single(torch.empty_like(tiny), tiny, group=group))
    a2a_alpha /= max(p - 1, 1)
    rows, splits = peer_rows(a2a_bytes or large, group, device)  # into a fresh buffer, as the dispatch receives
    t_a2a = timed(lambda: all_to_all.all_to_all_single(torch.empty_like(rows), rows, splits, splits, group=group))
    a2a_beta = rows.nbytes / max(t_a2a - (p - 1) * a2a_alpha, 1e-9)
    return CommModel(alpha_intra=alpha, beta_intra=beta, alpha_inter=alpha, beta_inter=beta,
                     ranks_per_node=ranks_per_node or p, a2a_beta_scale=a2a_beta / beta,
                     a2a_alpha_scale=a2a_alpha / alpha)


def measure_overlap(compute, a2a_bytes: int, group=None, repeats: int = 9, device=None) -> float:
    """The fraction of the shorter of (an exchange of ``a2a_bytes``, ``compute``) that launching the
    exchange without waiting and computing meanwhile saves: 1 = fully hidden, 0 = no gain, below 0
    = running them together is slower than one after the other (threads competing for cores)."""
    device = torch.device(device or "cpu")
    rows, splits = peer_rows(a2a_bytes, group, device)

    def exchange(wait: bool = True):
        pending = all_to_all.start_all_to_all(rows, splits, splits, group)
        if not wait:
            return pending
        pending.wait()

    def both():
        work = exchange(wait=False)
        compute()
        work.wait()

    t_a2a, t_compute, t_both = (timed_collective(op, group, repeats, device) for op in (exchange, compute, both))
    saved = t_compute + t_a2a - t_both
    return max(-1.0, min(1.0, saved / max(min(t_compute, t_a2a), 1e-9)))


def calibrate(w: Workload, device, adapter=None, max_tokens: int = 4096, ep_size: int | None = None,
              group=None) -> tuple[CommModel, ComputeModel]:
    """Measure this machine for ``w``: compute on this rank with ``adapter``'s modules (an
    AdapterConfig; default adamole with w's experts) at the first layer's shape (at most
    ``max_tokens`` tokens, the bank of N/``ep_size`` experts), and alpha/beta over the group when
    it has more than one rank, with all-to-alls the size of one layer's row exchange at
    ``ep_size`` (default: the whole world) and, when ``w.overlap``, the overlap fraction
    (collective: every rank calls it)."""
    from adamole_dist.config.adapter import AdapterConfig

    device = torch.device(device)
    d_in, d_out = w.layers[0]
    tokens = max(1, min(w.tokens_per_rank, max_tokens))
    adapter = adapter or AdapterConfig(method="adamole", num_experts=w.num_experts, rank=w.rank)
    J = ep_size or w.world_size
    bank = w.num_experts // J if J > 1 and w.num_experts % J == 0 else w.num_experts
    many = w.world_size > 1
    comp = measure_compute(d_in, d_out, tokens, adapter, bank, device=device, group=group if many else None)
    comm = CommModel()  # one rank: no communication to price
    if many:
        S = layer_traffic(w, J, d_in, d_out).rows_sent if w.num_experts % J == 0 else w.tokens_per_rank
        a2a_bytes = int(S * d_in * w.wire)  # one layer's rows: S out per rank
        # the same exchange on every rank: the group's mean
        a2a_bytes = int(collectives.sum_over_ranks([a2a_bytes], group)[0] / collectives.world_size(group))
        # the expert gradients' all-reduce at its own size (replicated: all of them), within 1-64 MB
        grad_bytes = min(max(w.expert_param_count * w.grad_bytes, 1 << 20), 64 << 20)
        comm = measure_comm(group, large=grad_bytes, a2a_bytes=a2a_bytes, device=device)
    whole_group = many and J == collectives.world_size(group)  # the dispatch is measured over it as one EP group
    comp.layer_s_per_param, comp.dispatch_fixed_s = measure_fixed(adapter, d_in, d_out, comm, group if many else None,
                                                                  dispatch=whole_group, device=device)
    if many and w.overlap:  # what really hides here: the own share's half (its first matmul) beside an exchange
        x = torch.randn(tokens // 2, d_in, device=device)
        A = torch.randn(d_in, w.num_experts * w.rank // J, device=device)
        # repeated to about the exchange's length: the fraction is a difference of the two divided by
        # the shorter, so a matmul a tenth of the exchange's length swung it from -1 to +0.3 by noise
        once = median_time(lambda: x @ A, 5, device)
        reps = max(1, min(64, round(comm.all_to_all(a2a_bytes, J) / max(once, 1e-9))))
        comp.overlap = measure_overlap(lambda: [x @ A for _ in range(reps)], a2a_bytes, group, device=device)
    return comm, comp


def calibrated_ep_size(w: Workload, device, adapter=None, expert_memory_budget_bytes: float | None = None,
                       group=None) -> tuple[int, str]:
    """``--ep_size auto``: calibrate for ``w`` over the whole group and take the cheapest placement
    (placement.choose_ep_size). Every rank measured its own compute, so rank 0's choice is
    broadcast and the layout agrees. Collective; returns (ep_size, why)."""
    comm, comp = calibrate(w, device, adapter=adapter, group=group)
    ep_size, _, why = choose_ep_size(w, comm, comp, expert_memory_budget_bytes)
    ep_size, why = collectives.broadcast_object((ep_size, why), src=0, group=group)
    return int(ep_size), why


def calibration_record(comm: CommModel, comp: ComputeModel) -> dict:
    """Every calibrated rate, for a benchmark record (all-to-all as absolute alpha and beta)."""
    return {**vars(comp),
            "alpha_s": comm.alpha_intra, "beta_Bps": comm.beta_intra,
            "a2a_alpha_s": comm.alpha_intra * comm.a2a_alpha_scale,
            "a2a_beta_Bps": comm.beta_intra * comm.a2a_beta_scale}


def parts_ms(detail: dict) -> dict:
    """A prediction's timed parts (its ``*_s`` entries) in milliseconds."""
    return {k: round(1000 * v, 3) for k, v in detail.items() if k.endswith("_s")}
