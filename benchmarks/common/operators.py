"""Count the computing aten operators a piece of code dispatches, views excluded: on a GPU each one is
a kernel launch, which at small batches costs more than its arithmetic.

    with ComputingOperators() as ops:
        loss.backward()
    ops.total, ops.counts.most_common(5)
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class ComputingOperators(TorchDispatchMode):
    """Counts every dispatched aten operator that is not a view (views only reinterpret memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
