"""Quiet transformers while the project loads models: its load report is per rank, colour-coded,
and wrong where an adapter follows; its progress bars are carriage-return noise in a log file."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level and no progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars are carriage-return noise in a log file
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()
