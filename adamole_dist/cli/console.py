"""The console look of the commands: the package's modules log through ``logging.getLogger(__name__)``
(children of the ``adamole_dist`` logger); a command's ``main`` calls ``configure_logging`` first, so those
lines print as they are ("%(message)s"), informational ones on stdout and warnings and errors on stderr.
Which rank says what is decided where the line is logged (rank 0 for the trainer's lines), not here.

Used as a library (no command), the package adds no handler: warnings still reach stderr through
logging's last-resort handler, and informational lines appear once the caller configures logging."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from adamole_dist.runtime.stopping import EXIT_INTERRUPTED, Terminated, sigterm_interrupts

PROJECT_LOGGER = "adamole_dist"


class _ConsoleHandler(logging.StreamHandler):
    """A handler writing to ``sys.stdout`` / ``sys.stderr`` as they are at each line (so a redirected or
    captured stream receives it), flushing after every line."""

    def __init__(self, stream_name: str, below: int | None = None, at_least: int | None = None):
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))
        if below is not None:
            self.addFilter(lambda record: record.levelno < below)
        if at_least is not None:
            self.setLevel(at_least)

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; the current sys stream is used
        pass


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Print the project's log lines as plain lines: below WARNING on stdout, WARNING and above on stderr.
    Idempotent (a second call, e.g. ``main`` run twice in one process, adds no second pair of handlers)."""
    logger = logging.getLogger(PROJECT_LOGGER)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler("stdout", below=logging.WARNING))
        logger.addHandler(_ConsoleHandler("stderr", at_least=logging.WARNING))
    logger.setLevel(level)
    logger.propagate = False  # not twice, should something configure the root logger too
    return logger


def interruptible(main: Callable[..., int]) -> Callable[..., int]:
    """A one-process command's ``main``: Ctrl-C or SIGTERM ends it with one "stopped:" line and
    EXIT_INTERRUPTED (130), not a traceback. What the commands write is written atomically (a
    temporary renamed into place), so the stop leaves no half-written output."""

    @functools.wraps(main)
    def stoppable(argv=None) -> int:
        try:
            with sigterm_interrupts():
                return main(argv)
        except (KeyboardInterrupt, Terminated) as e:
            what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
            print(f"stopped: interrupted by {what}; no output was left half-written", file=sys.stderr)
            return EXIT_INTERRUPTED

    return stoppable
