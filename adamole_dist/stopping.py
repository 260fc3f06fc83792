"""Why a run stops early, and the exit codes launch/train.py maps them to.

Stop requests (SIGTERM from SLURM's --signal or a preemption, and SIGUSR1; Ctrl-C is left
alone): the handler only sets a flag; the training loop agrees on it across ranks after each
optimizer step, writes a checkpoint and leaves with EXIT_PREEMPTED so the job script can requeue.
A non-finite loss stops every rank at the same step (the check is all-reduced)."""

from __future__ import annotations

import signal

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume from the checkpoint just written)


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    def __init__(self, step: int, checkpoint) -> None:
        super().__init__(f"stop requested by signal: checkpoint at step {step} written to {checkpoint}; "
                         "continue with --resume latest")
        self.step = step
        self.checkpoint = checkpoint


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None
