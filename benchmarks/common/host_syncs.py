"""Count host reads of tensors (each one a device sync on a GPU) and say whose code made them.

    with HostReads() as reads:
        train_step(...)
    reads.by_origin()   # {"adamole_dist": 2, "transformers": 1, "deepspeed": 1, "torch": 0}

Wraps ``Tensor.item``, ``.tolist``, ``.cpu``, ``__bool__``, ``__float__``, ``__int__`` and ``__index__`` for the
block. On a CPU nothing waits, but every such read of a value computed on a GPU stalls the host until
the queue drains, so the count on the CPU is the count on the GPU. A read is attributed to the first
frame outside torch's own Python files (torch.optim's step counters stay "torch"), by top-level
package of that frame's file: the project (``adamole_dist``), transformers, deepspeed, ...
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

WRAPPED = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")
_PROJECT = Path(__file__).resolve().parents[2]


def _origin(frame) -> tuple[str, str]:
    """(package, 'file:line') of the code that asked for the value."""
    first_torch = None
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__:
            parts = Path(path).parts
            if "torch" in parts and "site-packages" in parts and "optim" not in parts:
                first_torch = first_torch or path
            else:
                package = _package(path)
                return package, f"{Path(path).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "torch", first_torch or "?"


def _package(path: str) -> str:
    p = Path(path)
    if "site-packages" in p.parts:
        rest = p.parts[p.parts.index("site-packages") + 1:]
        if rest[:2] == ("torch", "optim"):
            return "torch"
        return rest[0].split(".")[0] if rest else "?"
    try:
        rel = p.resolve().relative_to(_PROJECT)
        return rel.parts[0] if rel.parts[0] in ("adamole_dist", "benchmarks", "tests", "launch") else "project"
    except ValueError:
        return "other"


class HostReads:
    """Context manager counting host reads of tensors; see the module docstring."""

    def __init__(self) -> None:
        self.reads: Counter = Counter()  # (package, where) -> count
        self._saved: dict[str, object] = {}
        self._busy = False  # a wrapped method that calls another (cpu() inside tolist) counts once

    def __enter__(self) -> "HostReads":
        for name in WRAPPED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def _wrap(self, original):
        probe = self

        def wrapper(tensor, *args, **kwargs):
            if probe._busy:
                return original(tensor, *args, **kwargs)
            probe._busy = True
            try:
                probe.reads[_origin(sys._getframe(1))] += 1
                return original(tensor, *args, **kwargs)
            finally:
                probe._busy = False

        wrapper.__name__ = getattr(original, "__name__", "wrapped")
        return wrapper

    def by_origin(self) -> dict[str, int]:
        out: Counter = Counter()
        for (package, _), n in self.reads.items():
            out[package] += n
        return dict(out)

    def project(self) -> int:
        return self.by_origin().get("adamole_dist", 0)

    def where(self, package: str = "adamole_dist") -> dict[str, int]:
        return {at: n for (pkg, at), n in self.reads.items() if pkg == package}
