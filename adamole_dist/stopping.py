"""Why a run stops early, and the exit codes launch/train.py maps them to.

Stop requests (SIGTERM from SLURM's --signal or a preemption, and SIGUSR1; Ctrl-C is left
alone): the handler only sets a flag; the training loop agrees on it across ranks after each
optimizer step, writes a checkpoint and leaves with EXIT_PREEMPTED so the job script can requeue.
Before any rank leaves, rank 0 also writes PREEMPTED_MARKER into the output dir: under
``srun --kill-on-bad-exit`` the first rank to exit 75 gets the others killed, so srun's own exit
code may be 143 instead of 75, and the job script needs a sign that does not race.
A non-finite loss stops every rank at the same step (the check is all-reduced)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from .atomic_files import write_text_atomically

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume from the checkpoint just written)
PREEMPTED_MARKER = "preempted.json"  # launch/slurm/train.sbatch removes it before srun, reads it after


def write_preempted_marker(output_dir: Path, step: int, checkpoint, signum: int | None) -> None:
    """Atomically record that this run stopped for a requeue after writing ``checkpoint``."""
    record = {"step": step, "checkpoint": str(checkpoint),
              "signal": signal.Signals(signum).name if signum else None}
    write_text_atomically(Path(output_dir) / PREEMPTED_MARKER, json.dumps(record))


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
