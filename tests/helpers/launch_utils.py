"""Helpers for tests that start real launchers (deepspeed, torchrun, python) as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# What the launcher tests train unless their own flags (given after it, so they win) say otherwise: the former
# default job, MiniLM-L6 on the multiple-choice word task (recipes/minilm_cpu.yaml), which trains in seconds,
# fp32 and unpacked as the defaults were when these tests were written. The default job itself (SmolLM2 on
# the chat task) is tests/integration/test_default_job.py's.
MINILM_JOB = ["--model", "minilm-l6", "--dataset", "builtin:word_categories", "--max_length", "64",
              "--micro_batch_size", "8", "--lr", "1e-3", "--max_steps", "300", "--autocast", "none", "--no-packing"]
# MINILM_JOB goes first in a command, before the test's own flags: a flag given twice takes the last value.


def deepspeed_cmd(nprocs: int, *args: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), TRAIN,
            *MINILM_JOB, *args]


def torchrun_cmd(nprocs: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(free_port()), TRAIN,
            *MINILM_JOB, *args]


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, TRAIN, *MINILM_JOB, *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["task_loss"] for r in records(run_dir, "train")}


def copy_run_at(src: Path, dst: Path, step: int) -> None:
    """A copy of a run directory as it was right after the checkpoint at ``step``."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    tag = f"step_{step:07d}"
    for p in ckpts.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name != tag:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(tag)
    kept = [line for line in (dst / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    shutil.rmtree(dst / "adapter", ignore_errors=True)
    (dst / "final_metrics.json").unlink(missing_ok=True)


SMALL_RUN = [
    "--max_train_examples", "400", "--max_eval_examples", "48", "--micro_batch_size", "4",
    "--max_length", "32", "--eval_interval", "0", "--log_interval", "1", "--lr", "3e-3",
]
