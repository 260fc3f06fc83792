"""One timer for device work: every benchmark, the training step's phase clock, the expert-parallel
dispatcher's phases and the all-to-all times use it.

On a CPU the host runs the work as it is issued, so ``time.perf_counter`` around it is its time. On
an accelerator the host only queues kernels: a bare ``perf_counter`` measures launch overhead. So

* ``wall_seconds(fn, device)`` / ``timed(device)`` synchronise the device before and after: the
  honest time of a whole region, for benchmarks (which warm up first) and calibration;
* ``DeviceClock`` accumulates named spans inside the hot path without synchronising: on CUDA each
  span records a pair of events, and the elapsed times are read (one wait for the last event) only
  when ``seconds()`` is asked, i.e. at the log interval; on the CPU the spans are wall time at once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait until the device has finished the work queued on it (a no-op on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


class Elapsed:
    """What ``timed`` measured: ``seconds`` is set when its block ends."""

    seconds: float = float("nan")


@contextmanager
def timed(device: torch.device | str | None):
    """``with timed(device) as t: ...`` then ``t.seconds``: the device synchronised on both sides."""
    result = Elapsed()
    synchronize(device)
    t0 = time.perf_counter()
    try:
        yield result
    finally:
        synchronize(device)
        result.seconds = time.perf_counter() - t0


def wall_seconds(fn, device: torch.device | str | None) -> float:
    """Seconds of ``fn()`` with the device synchronised before and after."""
    with timed(device) as t:
        fn()
    return t.seconds


class DeviceClock:
    """Named spans of device work, summed per name; see the module docstring. Not thread-safe."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._events: dict[str, list] = {}  # name -> [(start, end)] CUDA events not yet read

    @contextmanager
    def span(self, name: str, device: torch.device | str | None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Host time measured elsewhere (a wait on a collective, say)."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        """Seconds per name since the last reset. NOTE: on CUDA this waits for the spans' last events."""
        for name, pairs in self._events.items():
            for start, end in pairs:
                end.synchronize()
                self.add(name, start.elapsed_time(end) / 1000.0)  # elapsed_time is in milliseconds
        self._events = {}
        return dict(self._seconds)

    def total(self, name: str) -> float:
        return self.seconds().get(name, 0.0)

    def reset(self) -> None:
        self._seconds, self._events = {}, {}
