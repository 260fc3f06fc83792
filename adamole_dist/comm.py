"""The one autograd-aware all-to-all, the count exchange that sizes it, and traffic counters.

Split sizes always come from exchanged counts: on gloo a mismatch between what a sender
sends and what its receiver expects aborts the receiver or leaves part of its buffer
unwritten, so no split is ever computed independently on the two sides.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class TrafficCounters:
    """Bytes this rank sent to other ranks by all-to-all (forward and backward) and the time spent."""

    bytes_sent: int = 0
    bytes_min: int = 0
    a2a_seconds: float = 0.0
    calls: int = 0
    timings: dict = field(default_factory=dict)  # phase -> seconds (route/permute/a2a/compute/combine)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def reset(self) -> None:
        self.bytes_sent = self.bytes_min = self.calls = 0
        self.a2a_seconds = 0.0
        self.timings = {}


def remote_rows(splits: list[int], me: int) -> int:
    return sum(n for j, n in enumerate(splits) if j != me)


def timed_all_to_all(out, inp, out_splits, in_splits, group, counters: TrafficCounters | None, me: int,
                     min_row_bytes: int | None = None) -> None:
    t0 = time.perf_counter()
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    if counters is not None:
        # NOTE: on GPU this measures launch time only unless the caller synchronises.
        counters.a2a_seconds += time.perf_counter() - t0
        counters.calls += 1
        rows = remote_rows(in_splits, me)
        row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        counters.bytes_sent += rows * row_bytes
        counters.bytes_min += rows * (row_bytes if min_row_bytes is None else min_row_bytes)


class AllToAll(torch.autograd.Function):
    """Rows of ``x`` go to ranks by ``in_splits``; rows arrive by ``out_splits``. Backward reverses."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, counters, me, min_row_bytes, min_row_bytes_back):
        ctx.splits = (out_splits, in_splits)
        ctx.group, ctx.counters, ctx.me, ctx.min_back = group, counters, me, min_row_bytes_back
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        timed_all_to_all(out, x.contiguous(), out_splits, in_splits, group, counters, me, min_row_bytes)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        timed_all_to_all(back, grad.contiguous(), in_splits, out_splits, ctx.group, ctx.counters, ctx.me,
                         ctx.min_back)
        return back, None, None, None, None, None, None, None


def all_to_all(x, out_splits, in_splits, group, counters=None, me=0, min_row_bytes=None, min_row_bytes_back=None):
    return AllToAll.apply(x, out_splits, in_splits, group, counters, me, min_row_bytes, min_row_bytes_back)


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """recv[j] = how many rows rank j of the group will send to me."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def all_gather_stack(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """(size, *t.shape): every group member's tensor, in group-rank order."""
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)
