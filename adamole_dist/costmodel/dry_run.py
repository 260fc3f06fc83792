"""What the expert-parallel dispatch moves, measured on the real dispatcher instead of restated.

The placement model (placement.py) needs, per adapted layer and EP size, the bytes each all-to-all
sends, the rows that travel and the bytes the dispatch's own elementwise ops write (gathers, casts to
and from the wire, routing columns, the combine, the halves of the overlapped schedule, and their
backward). Rather than a formula beside the dispatcher that each change to it must repeat, one process
runs ``ExpertParallelDispatcher`` forward and backward as rank 0 of a symmetric group of J ranks
(:class:`LoopbackExchange`: every rank sends this one what it sends every other rank, so what arrives
is what left) on routing sampled as the model assumes (each token's experts uniform: top-k for a whole
number of active experts, else each expert on its own), and reads:

* the exchanges' bytes from the dispatcher's own traffic counters, each call in order;
* the copies by counting what every tensor operation writes (:class:`WrittenBytes`) minus what the
  same expert bank writes on the same rows alone (the experts have their own measured rates), with the
  transport itself left out (it is the exchanges' cost, not a copy).

The dry run takes at most ``DRY_RUN_TOKENS`` tokens and scales what it reads to the workload's (every
term is proportional to the tokens, or to the rows, which are). Cached per shape: the placement search
asks for the same layer at every candidate EP size more than once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adamole_dist.moe.experts import ExpertBank
from adamole_dist.moe.permute import local_columns
from adamole_dist.parallel.all_to_all import EVERY_BYTE, Exchange, MinBytes, TrafficCounters
from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
from adamole_dist.parallel.layout import ParallelLayout
from adamole_dist.parallel.local_dispatcher import resolve_path

DRY_RUN_TOKENS = 1024  # enough rows that the sampled fractions are within a few percent of their means

# Operations that write nothing (fresh uninitialised buffers, views, metadata).
_WRITE_NOTHING = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach",
                            "alias", "lift_fresh", "_local_scalar_dense", "set_", "resize_"})
# Operations that write their source's rows into a destination (the argument position of the source):
# in place only those rows; out of place a copy of the destination besides.
_WRITE_SOURCE = {"index_add": 3, "index_copy": 3, "index_put": 2, "scatter_add": 3, "masked_scatter": 2}


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def written_bytes(name: str, args: tuple, kwargs: dict, out) -> int:
    """The bytes one aten operation writes: an in-place one its destination (only the source rows for
    index_add_ and kin), an out-of-place one its fresh outputs (views of an input write nothing)."""
    if name in _WRITE_NOTHING:
        return 0
    scatter = _WRITE_SOURCE.get(name.removesuffix("_"))
    if scatter is not None:
        rows = _tensor_bytes(args[scatter]) if len(args) > scatter else 0
        return rows + (0 if name.endswith("_") else sum(_tensor_bytes(t) for t in _tensors(out)))
    if name.endswith("_"):
        return _tensor_bytes(args[0])
    if "out" in kwargs:
        return sum(_tensor_bytes(t) for t in _tensors(kwargs["out"]))
    inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list(kwargs.values()))}
    return sum(_tensor_bytes(t) for t in _tensors(out) if t.untyped_storage().data_ptr() not in inputs)


class WrittenBytes(TorchDispatchMode):
    """Counts the bytes every tensor operation writes while active (forward and autograd's backward
    alike), except while ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.bytes += written_bytes(func.overloadpacket.__name__, args, kwargs, out)
        return out


class _Loopback(torch.autograd.Function):
    """An all-to-all of a symmetric group seen from one rank: the rows that arrive are the rows that
    left (and their gradients likewise), its bytes recorded in both passes; the copy standing in for
    the transport is not counted as one of the dispatch's."""

    @staticmethod
    def forward(ctx, x, exchange: LoopbackExchange, out_splits: list[int], in_splits: list[int],
                min_bytes: MinBytes):
        ctx.exchange, ctx.out_splits, ctx.min_back = exchange, out_splits, min_bytes[1]
        exchange.record(x, in_splits, min_bytes[0])
        with exchange.transport():
            return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.exchange.record(grad, ctx.out_splits, ctx.min_back)
        with ctx.exchange.transport():
            return grad.clone(), None, None, None, None


@dataclass
class _Landed:
    rows: torch.Tensor


@dataclass(frozen=True, eq=False)
class LoopbackExchange(Exchange):
    """Rank ``my_rank`` of a symmetric group of ``size`` ranks, in one process, talking to no one (whatever
    process group is up): the counts that come in are the ones that go out, so every exchange's rows
    arrive as sent. Records each all-to-all's bytes to other ranks, in order, in both passes."""

    counter: WrittenBytes | None = None
    sent: list[int] = field(default_factory=list)  # bytes each all-to-all sends to other ranks, in order
    counted: list[int] = field(default_factory=list)  # bytes each count exchange sends to other ranks

    @contextlib.contextmanager
    def transport(self):
        """The rows' travel: not one of the dispatch's copies."""
        if self.counter is not None:
            self.counter.paused += 1
        try:
            yield
        finally:
            if self.counter is not None:
                self.counter.paused -= 1

    def record(self, inp: torch.Tensor, in_splits: list[int], min_bytes: int | None) -> None:
        assert self.counters is not None
        before = self.counters.bytes_sent
        super().record(inp, in_splits, min_bytes)
        self.sent.append(self.counters.bytes_sent - before)

    def counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        self.counted.append(math.prod(send_counts.shape[1:]) * (self.size - 1) * send_counts.element_size())
        return send_counts.clone()

    def all_gather_stack(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the dry run is dropless: capacity is not part of the placement model")

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   min_bytes: MinBytes = EVERY_BYTE) -> torch.Tensor:
        return _Loopback.apply(x, self, out_splits, in_splits, min_bytes)

    def launch(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],  # type: ignore[override]
               min_bytes: MinBytes = EVERY_BYTE) -> _Landed:
        return _Landed(self.all_to_all(x, out_splits, in_splits, min_bytes))

    def land(self, flight: _Landed) -> torch.Tensor:  # type: ignore[override]
        return flight.rows


@dataclass(frozen=True)
class DispatchTraffic:
    """One adapted layer's expert-parallel dispatch on one rank, forward and backward (scaled to the
    workload's tokens)."""

    exchanges_fwd: tuple[float, ...]  # bytes each forward all-to-all sends to other ranks, in order
    exchanges_bwd: tuple[float, ...]  # ... each backward one
    count_bytes: float  # the count exchange's bytes to other ranks
    copy_bytes: float  # what the dispatch's own operations write (the experts' and the transport's excluded)
    rows_sent: float  # rows to the other ranks (as many arrive, by symmetry)
    remote_pairs: float  # kept (token, expert) pairs among them: the received rows' expert work
    send_all: bool  # every token went once, in order (no gather, the combine lines up)

    @property
    def bytes_sent(self) -> float:
        return sum(self.exchanges_fwd) + sum(self.exchanges_bwd)


def sample_routing(tokens: int, num_experts: int, avg_active: float, generator: torch.Generator):
    """(weights, mask) of routing that keeps ``avg_active`` uniform experts per token: exactly that many
    for a whole number (top-k), else each expert with probability avg_active / N (threshold methods)."""
    k = round(avg_active)
    if abs(avg_active - k) < 1e-6 and 0 <= k <= num_experts:
        scores = torch.rand(tokens, num_experts, generator=generator)
        mask = torch.zeros(tokens, num_experts, dtype=torch.bool)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    else:
        p = min(max(avg_active / num_experts, 0.0), 1.0)
        mask = torch.rand(tokens, num_experts, generator=generator) < p
    weights = torch.rand(tokens, num_experts, generator=generator) * mask
    return weights, mask


def dispatch_traffic(tokens: int, d_in: int, d_out: int, num_experts: int, rank: int, ep_size: int,
                     avg_active: float, act_dtype: torch.dtype = torch.float32,
                     wire_dtype: torch.dtype | None = None, overlap: bool = False) -> DispatchTraffic:
    """The real dispatcher's traffic and copies for one layer of ``tokens`` per rank (module doc)."""
    run = min(tokens, DRY_RUN_TOKENS)
    got = _dry_run(run, d_in, d_out, num_experts, rank, ep_size, float(avg_active), act_dtype, wire_dtype, overlap)
    scale = tokens / run if run else 0.0
    return DispatchTraffic(
        exchanges_fwd=tuple(b * scale for b in got.exchanges_fwd),
        exchanges_bwd=tuple(b * scale for b in got.exchanges_bwd),
        count_bytes=got.count_bytes, copy_bytes=got.copy_bytes * scale, rows_sent=got.rows_sent * scale,
        remote_pairs=got.remote_pairs * scale, send_all=got.send_all)


@functools.lru_cache(maxsize=256)
def _dry_run(tokens: int, d_in: int, d_out: int, num_experts: int, rank: int, ep_size: int, avg_active: float,
             act_dtype: torch.dtype, wire_dtype: torch.dtype | None, overlap: bool) -> DispatchTraffic:
    generator = torch.Generator().manual_seed(0)
    weights, mask = sample_routing(tokens, num_experts, avg_active, generator)
    L = num_experts // ep_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bank = ExpertBank(L, rank, d_in, d_out, scaling=1.0, dtype=act_dtype)
    x = torch.randn(tokens, d_in, generator=generator).to(act_dtype)

    counter = WrittenBytes()
    exchange = LoopbackExchange(None, 0, ep_size, TrafficCounters(), counter=counter)
    layout = ParallelLayout(rank=0, world_size=ep_size, ep_size=ep_size)
    dispatcher = ExpertParallelDispatcher(layout, wire_dtype=wire_dtype, overlap=overlap, exchange=exchange)
    x_TD, w_TN = x.clone().requires_grad_(), weights.clone().requires_grad_()
    plan = dispatcher.plan(mask, x_TD, bank)  # uncounted: the dispatch's fixed host work, calibrated apart
    seed_TO = torch.ones(tokens, d_out, dtype=act_dtype)  # the backward's seed, written outside the count
    with counter:
        y_TO = dispatcher.run(plan, x_TD, w_TN, mask, bank, "auto")
        forward_calls = len(exchange.sent)
        y_TO.backward(seed_TO.to(y_TO.dtype))
    dispatch_bytes = counter.bytes

    # The same bank on the same rows alone: what the experts write, forward and backward.
    token_S, cols_SL = plan.permute.token_S, plan.permute.dest_S.unsqueeze(1) * L + torch.arange(L)
    own_in = (x.clone().requires_grad_(), local_columns(weights, 0, L).clone().requires_grad_(),
              local_columns(mask, 0, L))
    remote_m = mask[token_S.unsqueeze(1), cols_SL]
    remote_in = (x[token_S].requires_grad_(), weights[token_S.unsqueeze(1), cols_SL].requires_grad_(), remote_m)
    seeds = [seed_TO, torch.ones(len(token_S), d_out, dtype=act_dtype)]
    alone = WrittenBytes()
    with alone:
        outs = [bank(a, w, m, resolve_path("auto", m, bank)) for a, w, m in (own_in, remote_in)]
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(seeds, outs)])
    sent = exchange.sent
    return DispatchTraffic(
        exchanges_fwd=tuple(sent[:forward_calls]), exchanges_bwd=tuple(sent[forward_calls:]),
        count_bytes=exchange.counted[0],
        copy_bytes=max(dispatch_bytes - alone.bytes, 0), rows_sent=sum(plan.send),
        remote_pairs=float(remote_m.sum()), send_all=plan.once)
