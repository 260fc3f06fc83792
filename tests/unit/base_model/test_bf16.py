"""--autocast auto: bf16 where bf16 matmuls are fast, none elsewhere."""

import torch

from adamole_dist.base_model import bf16


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(bf16, "cpu_has_bf16", lambda: True)
    assert bf16.resolved_autocast("auto", "cpu") == "bf16"
    monkeypatch.setattr(bf16, "cpu_has_bf16", lambda: False)
    assert bf16.resolved_autocast("auto", "cpu") == "none"


def test_given_values_are_kept_and_other_devices_get_none(monkeypatch):
    monkeypatch.setattr(bf16, "cpu_has_bf16", lambda: True)
    assert bf16.resolved_autocast("none", "cpu") == "none" and bf16.resolved_autocast("bf16", "cpu") == "bf16"
    assert not bf16.bf16_is_fast(torch.device("meta"))


def test_cpu_flags_are_read_from_cpuinfo():
    flags = open("/proc/cpuinfo").read().split()
    bf16.cpu_has_bf16.cache_clear()
    assert bf16.cpu_has_bf16() == any(f in flags for f in bf16.CPU_BF16_FLAGS)
