"""Every collective the project issues goes through this module (tests/test_collectives.py
fails if another module calls a torch.distributed collective directly).

Why one home: a collective only runs on a device its process group has a backend for. Under
NCCL alone the group serves CUDA tensors only, and ``all_reduce(cpu_tensor)`` raises "No
backend type associated with device type cpu"; under gloo CPU tensors are native. So every
function here moves its tensors to a device the group serves (:func:`placement`), runs the
collective there and hands the result back on the caller's device. On a GPU machine the
trainer initialises mixed backends (``cpu:gloo,cuda:nccl``, process_group.py), so small host
values (stop flags, object collectives) stay on the CPU and activations go through NCCL.

All-to-alls of CPU tensors (gloo) run as point-to-point messages with every receive posted
first (:func:`_receives_first`: on a slow link gloo's own all-to-all can run the two directions
one after the other); on CUDA they are ``dist.all_to_all_single``.

Also here: :class:`Exchange`, expert parallelism's view of its group (the group, this rank,
the traffic counters), with the one autograd-aware all-to-all (waited, or launched and landed to
overlap computation), the count exchange that sizes it, and the all-gathers of capacity.
Split sizes always come from exchanged counts: on gloo a mismatch between what a sender sends
and what its receiver expects aborts the receiver or leaves part of its buffer unwritten, so no
split is ever computed independently on two sides.

Every function is a no-op (identity) without an initialised process group of more than one
rank, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from adamole_dist.parallel.device_timer import DeviceClock

# torch.distributed functions that communicate (or, like new_group, must be called by every
# rank): only this module may call them. tests/test_collectives.py scans the project for them.
COLLECTIVE_OPS = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "_all_gather_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list", "new_group", "new_subgroups",
    "new_subgroups_by_enumeration",
})


# -- where tensors must live ---------------------------------------------------------------------
def is_distributed(group=None) -> bool:
    """A process group of more than one rank is up (collectives have someone to talk to)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


DEFAULT_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}


def parse_backend_config(config: str) -> frozenset[str]:
    """Device types a backend config serves: 'cpu:gloo,cuda:nccl' -> {cpu, cuda}; 'nccl' -> {cuda}."""
    served: set[str] = set()
    for part in str(config).split(","):
        part = part.strip()
        if ":" in part:
            served.add(part.split(":", 1)[0])
        elif part:
            served.update(DEFAULT_DEVICES.get(part, ("cpu",)))
    return frozenset(served)


def served_device_types(group=None) -> frozenset[str]:
    """Device types the group's backends accept tensors on."""
    return parse_backend_config(dist.get_backend_config(group))


def placement(device: torch.device, served: frozenset[str], cuda_device: torch.device | None = None) -> torch.device:
    """Where a tensor on ``device`` must go for a collective on a group serving ``served``:
    where it is if served, else CUDA (NCCL alone), else the CPU. Pure; pinned by unit tests."""
    device = torch.device(device)
    if device.type in served:
        return device
    if "cuda" in served:
        if cuda_device is None:
            cuda_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
                torch.device("cuda")
        return cuda_device
    if "cpu" in served:
        return torch.device("cpu")
    raise RuntimeError(f"the process group serves only {sorted(served)}: no device to run a collective on")


def comm_device(group=None) -> torch.device:
    """The device to build small host-side values on (flags, counts): the CPU when the group
    serves it, else the current CUDA device."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return placement(torch.device("cpu"), served_device_types(group))


def _staged(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` itself if the group serves its device, else a copy on a device it does serve."""
    target = placement(t.device, served_device_types(group))
    return t if target == t.device else t.to(target)


# -- reductions, barriers, objects ---------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the group, in place; returns ``t`` (on its own device)."""
    if not is_distributed(group):
        return t
    staged = _staged(t, group)
    dist.all_reduce(staged, group=group)
    if staged is not t:
        t.copy_(staged)
    return t


def sum_over_ranks(values: list[float], group=None) -> list[float]:
    """Several host numbers summed over the group in ONE collective (float64)."""
    if not is_distributed(group):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()  # NOTE: device sync when the group has no CPU backend


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` (a global rank) on every rank of the group."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group=None) -> list:
    """Every group member's ``obj``, in group-rank order."""
    if not is_distributed(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_stack(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """(size, *t.shape): every group member's tensor, in group-rank order, on ``t``'s device."""
    if size == 1:
        return t.unsqueeze(0)
    staged = _staged(t.contiguous(), group)
    out = [torch.empty_like(staged) for _ in range(size)]
    dist.all_gather(out, staged, group=group)
    return torch.stack(out).to(t.device)


def new_group(ranks: list[int]):
    """Collective: every rank of the world calls it with the same ``ranks``, in the same order."""
    return dist.new_group(ranks)


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
    p, me = world_size(group), rank(group)
    sends, recvs = _rows(inp, in_splits, p), _rows(out, out_splits, p)
    recvs[me].copy_(sends[me])
    peers = [(me + i) % p for i in range(1, p)]  # staggered, so ranks do not all start on one peer
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
    staged_in = _staged(inp, group)
    staged_out = _staged(out, group)
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

    def record(self, inp: torch.Tensor, in_splits: list[int], me: int, min_bytes: int | None) -> None:
        """One all-to-all of ``inp``: the bytes it sent to other ranks, of which ``min_bytes`` are
        the minimum (None: all of them)."""
        self.calls += 1
        sent = remote_rows(in_splits, me) * math.prod(inp.shape[1:]) * inp.element_size()
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


def remote_rows(splits: list[int], me: int) -> int:
    return sum(n for j, n in enumerate(splits) if j != me)


# (forward, backward): of the bytes one all-to-all sends to other ranks, the minimum the caller states
# (None: all of them count). The backward's sends are the gradient's rows, with the splits swapped.
MinBytes = tuple[int | None, int | None]
EVERY_BYTE: MinBytes = (None, None)


@dataclass(frozen=True, eq=False)
class Exchange:
    """Who exchanges with whom, and who counts it: the process group, this rank in it (``me``), its
    size, and the traffic counters every all-to-all through it records into (None: uncounted). Each
    method is a collective: every member of the group calls it, in the same order.

    ``all_to_all`` waits; ``launch`` / ``land`` split one into a start and a wait (overlap), in
    both passes. Both are autograd-aware: the backward is the reverse exchange, splits swapped."""

    group: Any = None
    me: int = 0
    size: int = 1
    counters: TrafficCounters | None = None

    def span(self, device: torch.device):
        """The "a2a" time of the counters (nothing without them)."""
        return self.counters.span("a2a", device) if self.counters is not None else contextlib.nullcontext()

    def record(self, inp: torch.Tensor, in_splits: list[int], min_bytes: int | None) -> None:
        if self.counters is not None:
            self.counters.record(inp, in_splits, self.me, min_bytes)

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
               min_bytes: MinBytes = EVERY_BYTE) -> Flight:
        """Start :meth:`all_to_all` of ``x`` without waiting; pass the flight to :meth:`land`. Every
        rank must launch and land its flights in the same order (they do: the same code runs)."""
        flight = Flight(self, out_splits, in_splits, min_bytes)
        flight.token = _Launch.apply(x, flight)
        return flight

    def land(self, flight: Flight) -> torch.Tensor:
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
            staged_in = _staged(inp.contiguous(), group) if distributed else inp
            staged_out = _staged(out, group) if distributed else out
            self.work = _launch(staged_out, staged_in, out_splits, in_splits, group) if distributed else None
            if self.work is None:  # one rank: the rows are its own
                staged_out.copy_(staged_in)
        self.out: torch.Tensor | None = out
        self.staged_out: torch.Tensor | None = staged_out
        exchange.record(inp, in_splits, min_bytes)

    def wait(self) -> torch.Tensor:
        """The received tensor; once only. The handle lets go of every buffer here: it sits in an
        autograd context (Flight) beside the tensor it returns, so a reference kept would close a
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


class Flight:
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
    def forward(ctx, x, flight: Flight):
        ctx.flight = flight
        flight.forward = _PendingAllToAll(x, flight.out_splits, flight.in_splits, flight.exchange, flight.min_bytes[0])
        return x.new_empty(0)  # a token: orders the landing after the launch in the graph

    @staticmethod
    def backward(ctx, _token_grad):
        pending, ctx.flight.backward = ctx.flight.backward, None
        return pending.wait(), None


class _Land(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, flight: Flight):
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
