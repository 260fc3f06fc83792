"""Progress as a person at a terminal wants it, and as a log file wants it.

On a terminal, rank 0 draws tqdm bars for the training steps, evaluation, tokenisation and the GGUF
conversion; elsewhere (SLURM, CI, a pipe) carriage-return bars are noise in a file, so only the log lines
are written. ``--progress`` decides: auto (a bar when rank 0's stdout is a terminal), bar, log. A command
calls ``configure`` once; the floors below read the decision from here rather than taking it as an argument
through every call between the command and a ``datasets.map``.
"""

from __future__ import annotations

import contextlib
import sys

MODES = ("auto", "bar", "log")
_mode, _is_main = "auto", True


def configure(mode: str, is_main: bool = True) -> None:
    """This process's choice: ``mode`` of MODES; only the main rank (``is_main``) ever draws a bar."""
    global _mode, _is_main
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
    _mode, _is_main = mode, is_main


def bars_on() -> bool:
    """Does this process draw bars (the main rank, and bar mode or auto with stdout on a terminal)?"""
    if not _is_main or _mode == "log":
        return False
    return _mode == "bar" or sys.stdout.isatty()


def bar(total: int, desc: str, initial: int = 0, leave: bool = True):
    """A tqdm bar on stdout when ``bars_on()``, else None (the caller's log lines carry the progress)."""
    if not bars_on():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stdout)


def counter(desc: str):
    """A ``report(done, total)`` callback drawing a bar that goes when done, when ``bars_on()``; else None."""
    if not bars_on():
        return None
    made: list = []  # the bar, made at the first report (when the total is known)

    def report(done: int, total: int) -> None:
        if not made:
            made.append(bar(total=total, desc=desc, leave=False))
        made[0].update(done - made[0].n)
        if done >= total:
            made[0].close()
    return report


@contextlib.contextmanager
def datasets_bars():
    """``datasets``' own bars (its ``map`` while tokenising) on when ``bars_on()``, off otherwise; restored after."""
    import datasets

    before = datasets.utils.logging.is_progress_bar_enabled()
    (datasets.enable_progress_bars if bars_on() else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()
