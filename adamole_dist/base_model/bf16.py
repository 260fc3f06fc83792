"""Where bf16 matmuls are fast: what ``--autocast auto`` resolves by. A CUDA GPU that supports bf16
(Ampere and later), or a CPU with AVX512-BF16 or AMX (there bf16 autocast runs a 135M decoder's step about
1.2x faster than fp32; without them bf16 is emulated and slower than fp32)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Does /proc/cpuinfo list a bf16 matmul instruction set? (False where there is no such file.)"""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in CPU_BF16_FLAGS)


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def resolved_autocast(autocast: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> bf16 where bf16 is fast on ``device`` (default: cuda when available, else cpu), else none;
    any other value as given."""
    if autocast != "auto":
        return autocast
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if bf16_is_fast(torch.device(device)) else "none"
