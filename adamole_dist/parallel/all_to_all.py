"""The all-to-all machinery of expert parallelism; the basic reductions and broadcasts are collectives.py,
and together they are the project's one home of collectives.

All-to-alls of CPU tensors (gloo) run as point-to-point messages with every receive posted
first (:func:`_receives_first`: on a slow link gloo's own all-to-all can run the two directions
one after the other); on CUDA they are ``dist.all_to_all_single``.

:class:`Exchange` is expert parallelism's view of its group (the group, this rank in it, the traffic
counters), with the one autograd-aware all-to-all: waited (:meth:`Exchange.all_to_all`), or launched and
landed to overlap computation (:meth:`Exchange.launch` returns an :class:`AllToAllInFlight`, which
:meth:`Exchange.land` waits for), the count exchange that sizes it, and the all-gathers of capacity.
Split sizes always come from exchanged counts: on gloo a mismatch between what a sender sends
and what its receiver expects aborts the receiver or leaves part of its buffer unwritten, so no
split is ever computed independently on two sides.

Every function is a no-op (identity) without an initialised process group of more than one rank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from adamole_dist.parallel.collectives import all_gather_stack, is_distributed, on_served_device, rank, world_size
from adamole_dist.parallel.device_timer import DeviceClock


# -- all-to-all ------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, splits: list[int] | None, p: int) -> list[torch.Tensor]:
    """``t`` cut along its first dimension by ``splits`` (None: p equal parts), as views."""
    return list(torch.split(t, list(splits) if splits is not None else [t.shape[0] // p] * p))


class _Exchanges:
    """Point-to-point pieces of one all-to-all in flight; ``wait()`` waits for all of them."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def _receives_first(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group) -> _Exchanges:
    """An all-to-all of CPU tensors over gloo as point-to-point messages, every receive posted
    before any send. Why: gloo pairs a send with its receive by a handshake on the same TCP
    connection as the data, so when a rank's "ready to receive" is queued behind its own outgoing
    rows, the peer cannot start sending until those have drained and the two directions take turns:
    on a slow link about half the calls took twice as long; receives first, none did (measured in
    benchmarks/README.md, "Measurements behind the defaults"). On a fast link no difference."""
    p, my_rank = world_size(group), rank(group)
    sends, recvs = _rows(inp, in_splits, p), _rows(out, out_splits, p)
    recvs[my_rank].copy_(sends[my_rank])
    peers = [(my_rank + i) % p for i in range(1, p)]  # staggered, so ranks do not all start on one peer
    works = [dist.irecv(recvs[j], group=group, group_src=j) for j in peers if recvs[j].numel()]
    works += [dist.isend(sends[j], group=group, group_dst=j) for j in peers if sends[j].numel()]
    return _Exchanges(works)


def _launch(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group):
    """Start an all-to-all of ``inp`` into ``out`` (both on a device the group serves); a handle
    with ``wait()``."""
    if inp.device.type == "cpu":  # gloo
        return _receives_first(out, inp, out_splits, in_splits, group)
    work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
    assert work is not None  # async_op=True always returns a handle
    return work


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None, group=None) -> None:
    """All-to-all of rows on a device the group serves (``dist.all_to_all_single`` semantics);
    ``out`` is filled in place."""
    staged_in = on_served_device(inp, group)
    staged_out = on_served_device(out, group)
    if is_distributed(group):
        _launch(staged_out, staged_in.contiguous(), out_splits, in_splits, group).wait()
    else:
        staged_out.copy_(staged_in)
    if staged_out is not out:
        out.copy_(staged_out)


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """recv[j] = row j of rank j's ``send_counts`` (its counts for me: rows it will send me, ...)."""
    recv = torch.empty_like(send_counts)
    all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


@dataclass
class TrafficCounters:
    """Bytes this rank sent to other ranks by all-to-all (forward and backward), and the time spent:
    ``clock`` holds the all-to-alls' time ("a2a": launches and waits, both passes) and the
    dispatcher's phases (permute, expert_compute, combine), CUDA events read at ``timings``."""

    bytes_sent: int = 0
    bytes_min: int = 0
    calls: int = 0
    clock: DeviceClock = field(default_factory=DeviceClock)

    def record(self, inp: torch.Tensor, in_splits: list[int], my_rank: int, min_bytes: int | None) -> None:
        """One all-to-all of ``inp``: the bytes it sent to other ranks, of which ``min_bytes`` are
        the minimum (None: all of them)."""
        self.calls += 1
        sent = remote_rows(in_splits, my_rank) * math.prod(inp.shape[1:]) * inp.element_size()
        self.bytes_sent += sent
        self.bytes_min += sent if min_bytes is None else min_bytes

    def span(self, phase: str, device: torch.device):
        return self.clock.span(phase, device)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase since the last reset. NOTE: on CUDA a device sync (read at log intervals)."""
        return self.clock.seconds()

    @property
    def a2a_seconds(self) -> float:
        return self.timings.get("a2a", 0.0)

    def reset(self) -> None:
        self.bytes_sent = self.bytes_min = self.calls = 0
        self.clock.reset()


def remote_rows(splits: list[int], my_rank: int) -> int:
    return sum(n for j, n in enumerate(splits) if j != my_rank)


# (forward, backward): of the bytes one all-to-all sends to other ranks, the minimum the caller states
# (None: all of them count). The backward's sends are the gradient's rows, with the splits swapped.
MinBytes = tuple[int | None, int | None]
EVERY_BYTE: MinBytes = (None, None)


@dataclass(frozen=True, eq=False)
class Exchange:
    """Who exchanges with whom, and who counts it: the process group, this rank in it (``my_rank``), its
    size, and the traffic counters every all-to-all through it records into (None: uncounted). Each
    method is a collective: every member of the group calls it, in the same order.

    ``all_to_all`` waits; ``launch`` / ``land`` split one into a start and a wait (overlap), in
    both passes. Both are autograd-aware: the backward is the reverse exchange, splits swapped."""

    group: Any = None
    my_rank: int = 0
    size: int = 1
    counters: TrafficCounters | None = None

    def span(self, device: torch.device):
        """The "a2a" time of the counters (nothing without them)."""
        return self.counters.span("a2a", device) if self.counters is not None else contextlib.nullcontext()

    def record(self, inp: torch.Tensor, in_splits: list[int], min_bytes: int | None) -> None:
        if self.counters is not None:
            self.counters.record(inp, in_splits, self.my_rank, min_bytes)

    def counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """:func:`exchange_counts` over the group (not counted as traffic)."""
        return exchange_counts(send_counts, self.group)

    def all_gather_stack(self, t: torch.Tensor) -> torch.Tensor:
        """:func:`all_gather_stack` over the group: (size, *t.shape)."""
        return all_gather_stack(t, self.group, self.size)

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   min_bytes: MinBytes = EVERY_BYTE) -> torch.Tensor:
        """Rows of ``x`` go to ranks by ``in_splits``; rows arrive by ``out_splits`` (waited for)."""
        return AllToAll.apply(x, out_splits, in_splits, self, min_bytes)

    def launch(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               min_bytes: MinBytes = EVERY_BYTE) -> AllToAllInFlight:
        """Start :meth:`all_to_all` of ``x`` without waiting; pass the flight to :meth:`land`. Every
        rank must launch and land its flights in the same order (they do: the same code runs)."""
        flight = AllToAllInFlight(self, out_splits, in_splits, min_bytes)
        flight.token = _Launch.apply(x, flight)
        return flight

    def land(self, flight: AllToAllInFlight) -> torch.Tensor:
        """Wait for a launched all-to-all; returns the received rows (autograd flows through). The
        flight lets go of its token here: it sits in the launch node's context, so holding on to it
        would close a cycle through the graph's C++ nodes (see :meth:`_PendingAllToAll.wait`)."""
        token, flight.token = flight.token, None
        if token is None:
            raise RuntimeError("an all-to-all in flight was landed twice")
        return _Land.apply(token, flight)


def _counted_all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                        exchange: Exchange, min_bytes: int | None) -> None:
    """``all_to_all_single`` over the exchange's group, timed and counted: bytes sent to other ranks,
    and of those the minimum the caller states."""
    with exchange.span(inp.device):
        all_to_all_single(out, inp, out_splits, in_splits, group=exchange.group)
    exchange.record(inp, in_splits, min_bytes)


class AllToAll(torch.autograd.Function):
    """Rows of ``x`` go to ranks by ``in_splits``; rows arrive by ``out_splits``. Backward reverses.
    ``min_bytes``: what of this rank's sends (forward, backward) is the minimum (:data:`MinBytes`)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, exchange: Exchange, min_bytes: MinBytes):
        ctx.splits, ctx.exchange, ctx.min_back = (out_splits, in_splits), exchange, min_bytes[1]
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        _counted_all_to_all(out, x.contiguous(), out_splits, in_splits, exchange, min_bytes[0])
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        _counted_all_to_all(back, grad.contiguous(), in_splits, out_splits, ctx.exchange, ctx.min_back)
        return back, None, None, None, None


# -- all-to-all in flight: overlap with computation ----------------------------------------------
class _PendingAllToAll:
    """One all-to-all launched without waiting (async_op): ``wait()`` returns the received tensor on
    the caller's device. Staging to a device the group serves happens at launch and at wait."""

    def __init__(self, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], exchange: Exchange,
                 min_bytes: int | None) -> None:
        out = inp.new_empty((sum(out_splits),) + tuple(inp.shape[1:]))
        self.exchange = exchange
        group = exchange.group
        with exchange.span(inp.device):
            distributed = is_distributed(group)
            staged_in = on_served_device(inp.contiguous(), group) if distributed else inp
            staged_out = on_served_device(out, group) if distributed else out
            self.work = _launch(staged_out, staged_in, out_splits, in_splits, group) if distributed else None
            if self.work is None:  # one rank: the rows are its own
                staged_out.copy_(staged_in)
        self.out: torch.Tensor | None = out
        self.staged_out: torch.Tensor | None = staged_out
        exchange.record(inp, in_splits, min_bytes)

    def wait(self) -> torch.Tensor:
        """The received tensor; once only. The handle lets go of every buffer here: it sits in an
        autograd context (AllToAllInFlight) beside the tensor it returns, so a reference kept would close a
        cycle through the graph's C++ nodes that Python's collector cannot see (with overlap on, memory
        grew every step until this let go: benchmarks/README.md, "Measurements behind the defaults")."""
        out, staged_out, work = self.out, self.staged_out, self.work
        if out is None or staged_out is None:
            raise RuntimeError("an all-to-all in flight was waited for twice")
        with self.exchange.span(out.device):  # the exposed part: what computation did not hide
            if work is not None:
                work.wait()
            self.out = self.staged_out = self.work = None
            if staged_out is not out:
                out.copy_(staged_out)
        return out


def start_all_to_all(inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> _PendingAllToAll:
    """An all-to-all of rows launched without waiting (no autograd, uncounted): ``.wait()`` returns
    what arrived."""
    return _PendingAllToAll(inp, out_splits, in_splits, Exchange(group), None)


class AllToAllInFlight:
    """An all-to-all split into launch and wait, in both passes (:meth:`Exchange.launch` /
    :meth:`Exchange.land`): the forward's rows travel between the two calls, and in the backward the
    gradient's rows travel from the ``land`` node's backward to the ``launch`` node's backward,
    while autograd runs whatever it reaches in between."""

    def __init__(self, exchange: Exchange, out_splits: list[int], in_splits: list[int], min_bytes: MinBytes) -> None:
        self.exchange, self.out_splits, self.in_splits, self.min_bytes = exchange, out_splits, in_splits, min_bytes
        self.token: torch.Tensor | None = None  # the launch node's output, until landed
        self.forward: _PendingAllToAll | None = None
        self.backward: _PendingAllToAll | None = None


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight: AllToAllInFlight):
        ctx.flight = flight
        flight.forward = _PendingAllToAll(x, flight.out_splits, flight.in_splits, flight.exchange, flight.min_bytes[0])
        return x.new_empty(0)  # a token: orders the landing after the launch in the graph

    @staticmethod
    def backward(ctx, _token_grad):
        pending, ctx.flight.backward = ctx.flight.backward, None
        return pending.wait(), None


class _Land(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, flight: AllToAllInFlight):
        ctx.flight = flight
        pending, flight.forward = flight.forward, None
        if pending is None:
            raise RuntimeError("an all-to-all was landed before it was launched")
        return pending.wait()

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        f.backward = _PendingAllToAll(grad, f.in_splits, f.out_splits, f.exchange, f.min_bytes[1])
        return grad.new_empty(0), None
