"""Keep freed host memory for reuse instead of handing it back to the kernel after every tensor.

glibc serves an allocation above its mmap threshold (which adapts up to 32 MB) with fresh pages
from the kernel and unmaps them on free, so every large CPU tensor — each all-to-all receive
buffer, each combined delta, each gradient of an expert-parallel layer — is page-faulted and
zeroed by the kernel again, every step. On a CPU that costs more than filling the tensor, and it
dominated an expert-parallel step (the measurements: benchmarks/README.md, "Measurements behind the
defaults").

``keep_freed_host_memory`` raises the mmap and trim thresholds with ``mallopt``, so freed blocks
stay in the heap for the next tensor — what CUDA's caching allocator does for GPU memory. The
price is the same as there: the process keeps its peak host memory until it exits. It changes
nothing but where host memory comes from; on a platform without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BELOW_BYTES = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap


def keep_freed_host_memory() -> bool:
    """Make glibc reuse freed blocks below ``KEEP_BELOW_BYTES`` (True when it took effect)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW_BYTES))
