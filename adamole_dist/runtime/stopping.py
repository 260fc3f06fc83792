"""Why a run stops early, and the exit codes launch/train.py maps them to.

Stop requests (SIGTERM from SLURM's --signal or a preemption, SIGUSR1, Ctrl-C/SIGINT, and the
deepspeed launcher going away): the handler only sets a flag; the training loop agrees on it
across ranks after each optimizer step and after each evaluation batch, writes a checkpoint and
leaves with EXIT_PREEMPTED so the job script can requeue. A second Ctrl-C changes nothing but a
note: the stop is already as near as the next step or evaluation batch, and interrupting the
checkpoint it is heading for would lose the run's progress instead (torchrun also forwards the
terminal's Ctrl-C to ranks that got it already, so one press arrives twice). SIGKILL abandons a
run without a checkpoint.

The deepspeed runner (``deepspeed ...``) dies at once on SIGTERM without telling its child
``deepspeed.launcher.launch``, which goes on running the ranks; so under that launcher each rank
watches its parent (launch.py) and grandparent (the runner) and treats either one's exit as a
stop request (``LauncherWatch``).
Before any rank leaves, rank 0 also writes PREEMPTED_MARKER into the output dir: under
``srun --kill-on-bad-exit`` the first rank to exit 75 gets the others killed, so srun's own exit
code may be 143 instead of 75, and the job script needs a sign that does not race.
A non-finite loss stops every rank at the same step (the check is all-reduced).

Before the loop there is no checkpoint to head for, and the long phases there -- reading and
tokenizing the data, converting and loading the model -- may sit for minutes inside library code (a
chat template that loops never reaches a step boundary). So during them (``StopSignal.raising_during``)
a stop signal raises ``StoppedBeforeTraining`` at once in the main thread, the phases' own cleanup
(temporary cache folders) runs as it unwinds, and the command exits EXIT_PREEMPTED with one line: nothing
was written to the output directory yet, and the same command (or --resume latest) starts again. It
is a BaseException, like KeyboardInterrupt, so no ``except Exception`` on its way (a template renderer
turning errors into DataError, rank 0's outcome for the others) can mistake it for bad input. The output
directory's preparation itself is never interrupted: it runs after these phases, under the plain flag.

The one-process commands (eval, generate, export) have no checkpoint either: ``sigterm_interrupts``
makes SIGTERM raise Terminated as Ctrl-C raises KeyboardInterrupt, and the command ends with one line
and EXIT_INTERRUPTED, what it writes being written atomically (nothing half-written stays).

A checkpoint that cannot be written (disk full, quota) ends the run with CheckpointWriteError and
EXIT_WRITE_FAILED, its partial folder removed, the previous checkpoint and ``latest`` untouched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from adamole_dist.atomic_files import write_text_atomically

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint could not be written (disk full); the previous one is intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resume from the checkpoint just written, or start again)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a one-process command (eval, generate, export) stopped by Ctrl-C or SIGTERM
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


class StoppedBeforeTraining(BaseException):
    """A stop signal during set-up (see the module docstring): raised at once; exit EXIT_PREEMPTED."""

    def __init__(self, signum: int, phase: str) -> None:
        super().__init__(f"stop requested by signal ({signal.Signals(signum).name}) while {phase}; nothing was "
                         "written to output_dir and no checkpoint exists yet: run the same command again to start")
        self.signum, self.phase = signum, phase


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (train/checkpoint.py); exit EXIT_WRITE_FAILED."""


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.announce = announce  # print the note on a repeated request (rank 0 only: one line, not one per rank)
        self.phase: str | None = None  # while set, a stop raises StoppedBeforeTraining at once (raising_during)

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        LauncherWatch(self).start()
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            if self.phase is not None:
                phase, self.phase = self.phase, None  # once: the cleanup it unwinds through is not interrupted
                raise StoppedBeforeTraining(signum, phase)
        elif self.announce:
            self.announce = False  # once
            # os.write, not print: the signal may land while the main thread is inside a print to stderr
            os.write(2, f"{signal.Signals(signum).name}: a stop is already under way (checkpoint, then exit "
                        f"{EXIT_PREEMPTED}); SIGKILL abandons the run without one\n".encode())

    @contextlib.contextmanager
    def raising_during(self, phase: str) -> Iterator[None]:
        """Within the block a stop signal raises StoppedBeforeTraining(``phase``: "tokenizing the data", ...)
        at once in the main thread, instead of waiting for a step boundary; one already received raises
        on entry. Only for phases that write nothing a stop could leave half-done, or that clean up as
        they unwind (the token cache's and the model cache's temporary folders)."""
        if self.received is not None:
            raise StoppedBeforeTraining(self.received, phase)
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def settle(self) -> None:
        """The stop is done (checkpoint and marker written): later signals are ignored. Python puts the
        default handlers back while the interpreter shuts down, and a Ctrl-C landing then would kill
        the process (no exit 75) or raise KeyboardInterrupt in an exit hook; an ignored one cannot."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def request(self, signum: int) -> None:
        """A stop request that did not come as a signal to this process (see LauncherWatch); during a
        ``raising_during`` phase it is sent to this process as that signal, so the main thread raises."""
        if self.received is None and self.phase is not None:
            os.kill(os.getpid(), signum)
        elif self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


class Terminated(BaseException):
    """SIGTERM to a one-process command (``sigterm_interrupts``). Not a KeyboardInterrupt: a chat that
    catches Ctrl-C to stop one reply must still end on SIGTERM."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt:
    a one-process command unwinds (its temporaries removed) and reports one line, whichever stopped it."""

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parent_pid(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None where there is no /proc or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" where there is no such process)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LauncherWatch:
    """Under the deepspeed launcher: a stop request (as SIGTERM) when launch.py or the runner exits."""

    def __init__(self, stop: StopSignal, interval_s: float = 1.0) -> None:
        self.stop = stop
        self.interval_s = interval_s
        self.launch = os.getppid()
        self.runner = parent_pid(self.launch)

    def applies(self) -> bool:
        return self.runner is not None and "deepspeed.launcher.launch" in process_cmdline(self.launch)

    def start(self) -> "LauncherWatch":
        if self.applies():
            threading.Thread(target=self._run, name="launcher-watch", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stop.requested:
            time.sleep(self.interval_s)
            if os.getppid() != self.launch or parent_pid(self.launch) != self.runner:
                self.stop.request(signal.SIGTERM)
