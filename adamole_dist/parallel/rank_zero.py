"""Rank 0 decides, every rank raises the same error together.

Reading a shared output directory, a data file or a token cache is rank 0's job: one reader, one
writer, one verdict. :func:`rank0_decides` runs the work on rank 0 and hands every rank its result,
or makes every rank raise the same error at the same point, so no rank goes on into a collective
that the others have left (which would hang until the process group's timeout).

An error of one of the ``expected`` classes (bad input: ConfigError, DataError) is raised on every
rank as that class with rank 0's message; rank 0 raises the original (its traceback intact). Any other
error is a failure of rank 0: raised there as it is, elsewhere as ``RuntimeError("rank 0: ...")``.

:class:`CollectiveRanks` is this process's place in the job with the collectives data/ needs, the
``Ranks`` data/ranks.py describes (data/ may not import this floor, so it is passed in).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from adamole_dist.parallel import collectives

T = TypeVar("T")
BAD_INPUT: tuple[type[Exception], ...] = (ValueError,)  # ConfigError and DataError are ValueErrors
STILL_WORKING = None  # what rank 0 broadcasts while its work runs in a thread (the outcome is never None)


def _outcome(work: Callable[[], Any], expected: tuple[type[Exception], ...]) -> tuple:
    """("ok", result), ("expected", class, message, exception) or ("failed", message, exception)."""
    try:
        return ("ok", work())
    except expected as e:
        return ("expected", type(e), str(e), e)
    except Exception as e:  # any other failure must still reach the waiting ranks
        return ("failed", f"{type(e).__name__}: {e}", e)


def _in_thread(work: Callable[[], Any], expected: tuple[type[Exception], ...], poll_s: float) -> tuple:
    """Rank 0: the outcome of ``work`` run in a thread, broadcasting "still working" every ``poll_s``."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(outcome=_outcome(work, expected)), name="rank0-work",
                              daemon=True)
    worker.start()
    while worker.is_alive():
        collectives.broadcast_object(STILL_WORKING)  # the others wait in short collectives
        worker.join(poll_s)
    return box.get("outcome", ("failed", "the rank-0 worker thread stopped without a result", None))


def rank0_decides(work: Callable[[], T], *, expected: tuple[type[Exception], ...] = BAD_INPUT,
                  poll_s: float | None = None) -> T:
    """``work()`` run by rank 0 alone; its result on every rank (rank 0's own object there, a broadcast
    copy elsewhere), or its error raised on every rank (see the module docstring). ``poll_s``: rank 0
    works in a thread while the others wait in collectives of that period. Collective: every rank calls it."""
    if not collectives.is_distributed():
        return work()
    if collectives.rank() == 0:
        outcome = _in_thread(work, expected, poll_s) if poll_s else _outcome(work, expected)
        collectives.broadcast_object(outcome[:3] if outcome[0] == "expected" else outcome[:2])
        if outcome[0] == "ok":
            return outcome[1]
        if outcome[-1] is not None:
            raise outcome[-1]
        raise RuntimeError(outcome[1])
    while (sent := collectives.broadcast_object(STILL_WORKING)) is STILL_WORKING:
        pass
    if sent[0] == "ok":
        return sent[1]
    if sent[0] == "expected":
        raise sent[1](sent[2])
    raise RuntimeError(f"rank 0: {sent[1]}")


@dataclass(frozen=True)
class CollectiveRanks:
    """This process among the job's ranks, with the collectives data/ asks for (data/ranks.py's ``Ranks``)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank0_decides(self, work: Callable[[], T], *, expected: tuple[type[Exception], ...] = BAD_INPUT,
                      poll_s: float | None = None) -> T:
        return rank0_decides(work, expected=expected, poll_s=poll_s)

    def all_gather_objects(self, obj: Any) -> list:
        return collectives.all_gather_objects(obj)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return collectives.sum_over_ranks(values)
