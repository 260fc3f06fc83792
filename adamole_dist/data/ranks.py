"""What data/ needs of the job's other ranks, passed in: data/ may not import parallel/ (the one home of
collectives), so whoever calls it hands over a ``Ranks`` -- parallel/rank_zero.py's ``CollectiveRanks``
in a distributed job, ``ONE_PROCESS`` otherwise.

The agreement every multi-rank data step follows: rank 0 reads or builds (one reader of a shared
file, one builder of a cache), and every rank gets its result or raises the same error, together
(``rank0_decides``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.examples import DataError

T = TypeVar("T")
# The errors of bad input that rank 0 may find for everyone: every rank raises the same one.
INPUT_ERRORS: tuple[type[Exception], ...] = (DataError, ConfigError)


class Ranks(Protocol):
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def rank0_decides(self, work: Callable[[], T], *, expected: tuple[type[Exception], ...] = INPUT_ERRORS,
                      poll_s: float | None = None) -> T:
        """``work()`` run by rank 0 alone; its result on every rank, or its error (of ``expected``) raised
        on every rank. ``poll_s``: rank 0 works in a thread and the others wait in short collectives of
        that period (a long build would time one long wait out)."""
        ...

    def all_gather_objects(self, obj: Any) -> list: ...

    def sum_over_ranks(self, values: list[float]) -> list[float]: ...


@dataclass(frozen=True)
class OneProcess:
    """The ``Ranks`` of a job of one process: rank 0 decides alone, sums are the numbers themselves."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return True

    def rank0_decides(self, work: Callable[[], T], *, expected: tuple[type[Exception], ...] = INPUT_ERRORS,
                      poll_s: float | None = None) -> T:
        return work()

    def all_gather_objects(self, obj: Any) -> list:
        return [obj]

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]


ONE_PROCESS = OneProcess()
