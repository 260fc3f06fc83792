"""The one device timer: honest on an accelerator (synchronised regions, CUDA events read late) and
plain wall time on the CPU. A CUDA-like device is faked so the test runs on a CPU-only machine."""

import torch

from adamole_dist.parallel import device_timer
from adamole_dist.parallel.all_to_all import TrafficCounters
from adamole_dist.train.step import PhaseClock


class FakeCuda:
    """Stands in for torch.cuda: records synchronisations and events in order."""

    def __init__(self):
        self.log = []
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self):
                fake.log.append("record")
                self.at = len(fake.log)

            def synchronize(self):
                fake.log.append("event_sync")

            def elapsed_time(self, end):
                return 1000.0 * (end.at - self.at)  # milliseconds: one "second" per log entry between

        self.Event = Event

    def synchronize(self, device=None):
        self.log.append("sync")


def fake_cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    return fake


def test_timed_regions_synchronise_the_accelerator_on_both_sides(monkeypatch):
    fake = fake_cuda(monkeypatch)
    cuda = torch.device("cuda")
    seconds = device_timer.wall_seconds(lambda: fake.log.append("work"), cuda)
    assert fake.log == ["sync", "work", "sync"]
    assert seconds >= 0
    fake.log.clear()
    clock = PhaseClock(cuda)
    with clock.phase("forward"):
        fake.log.append("work")
    assert fake.log == ["sync", "work", "sync"] and clock.seconds["forward"] >= 0


def test_device_clock_records_events_and_waits_only_when_read(monkeypatch):
    fake = fake_cuda(monkeypatch)
    clock = device_timer.DeviceClock()
    for _ in range(2):
        with clock.span("a2a", torch.device("cuda")):
            fake.log.append("work")
    assert "sync" not in fake.log and "event_sync" not in fake.log  # the hot path never waits
    assert fake.log == ["record", "work", "record"] * 2
    assert clock.seconds() == {"a2a": 4.0}  # two spans of two log entries each, read from the events
    assert fake.log.count("event_sync") == 2
    assert clock.seconds() == {"a2a": 4.0}  # read once: the events are consumed, the sum kept
    clock.reset()
    assert clock.seconds() == {}


def test_traffic_counters_time_phases_through_the_clock_on_cpu():
    counters = TrafficCounters()
    with counters.span("a2a", torch.device("cpu")):
        sum(range(1000))
    with counters.span("combine", torch.device("cpu")):
        pass
    assert set(counters.timings) == {"a2a", "combine"}
    assert counters.a2a_seconds == counters.timings["a2a"] > 0
    counters.record(torch.zeros(6, 4), [2, 3, 1], my_rank=1, min_bytes=None)
    assert counters.bytes_sent == 3 * 4 * 4 and counters.calls == 1
    counters.reset()
    assert counters.a2a_seconds == 0.0 and counters.bytes_sent == 0


def test_cpu_regions_need_no_synchronisation(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("CPU timing must not touch torch.cuda")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda, "Event", forbidden)
    assert device_timer.wall_seconds(lambda: None, torch.device("cpu")) >= 0
    clock = device_timer.DeviceClock()
    with clock.span("x", "cpu"):
        pass
    assert clock.total("x") >= 0
