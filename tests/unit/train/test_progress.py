"""Progress on a terminal, log lines elsewhere: a real training run (launch/train.py, one process, a tiny
BERT) under a pseudo-terminal draws tqdm bars with its log lines above them; through a pipe (SLURM, CI)
it writes the log lines alone, no carriage-return bar. ``--progress bar|log`` overrides auto."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios

import pytest

from adamole_dist import progress
from tests.helpers.launch_utils import REPO, launch_env, python_cmd
from tests.helpers.tiny_models import write_tiny_bert

LOG_LINE = "[step 2/2] task_loss"


def run_in_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """``cmd`` with stdout and stderr on a pseudo-terminal of 100 columns; (exit code, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=launch_env(), cwd=REPO)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=timeout), shown.decode(errors="replace")


def test_training_shows_a_bar_on_a_terminal_and_log_lines_through_a_pipe(tmp_path):
    model = write_tiny_bert(tmp_path / "tiny_bert")
    args = ["--model", str(model), "--max_train_examples", "16", "--max_eval_examples", "8", "--micro_batch_size", "4",
            "--max_length", "32", "--max_steps", "2", "--log_interval", "1", "--no-eval_at_start", "--num_experts",
            "2", "--rank", "2", "--report_to", "none", "--save_interval", "0"]
    code, shown = run_in_terminal(python_cmd(*args, "--output_dir", str(tmp_path / "tty")))
    assert code == 0, shown[-3000:]
    assert "train: 100%" in shown and "it/s" in shown and "\r" in shown  # tqdm's bar, redrawn in place
    assert LOG_LINE in shown  # the log lines are still written, above the bar

    piped = subprocess.run(python_cmd(*args, "--output_dir", str(tmp_path / "pipe")), env=launch_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert LOG_LINE in piped.stdout
    assert "train:" not in piped.stdout + piped.stderr and "\r" not in piped.stdout + piped.stderr


@pytest.mark.parametrize("mode, is_main, expected", [("bar", True, True), ("log", True, False),
                                                     ("auto", True, False), ("bar", False, False)])
def test_progress_mode_decides_bars(monkeypatch, mode, is_main, expected):
    monkeypatch.setattr(progress, "_mode", progress._mode)
    monkeypatch.setattr(progress, "_is_main", progress._is_main)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)  # as under SLURM, CI or a pipe
    progress.configure(mode, is_main)
    assert progress.bars_on() is expected
