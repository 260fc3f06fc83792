"""Faults an operator meets, end to end through launch/train.py (tiny BERT, gloo):

* a resume discards the records of the steps after its checkpoint (metrics.jsonl stays one record
  per step) and clears the preempted marker;
* a damaged checkpoint is named, file and all, with the newest good one, and nothing is touched;
  resuming from the good one works;
* SIGTERM to the ``deepspeed`` runner (which dies at once without telling its children) still
  reaches the ranks: they checkpoint, write preempted.json and exit 75, none is left running;
  SIGTERM to torchrun does the same.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launch_utils import REPO, check, deepspeed_cmd, launch_env, python_cmd, records, run, torchrun_cmd, train_losses
from tiny_models import write_tiny_bert

pytestmark = pytest.mark.slow

STEPS, SAVE = 8, 4


def small(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--output_dir", str(out), "--max_train_examples", "64", "--max_eval_examples", "8",
            "--micro_batch_size", "4", "--max_length", "32", "--log_interval", "1", "--eval_interval", str(SAVE),
            "--no-eval_at_start", "--num_experts", "4", "--rank", "2", "--lr", "1e-2", "--report_to", "none",
            "--keep_checkpoints", "3", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = write_tiny_bert(root / "tiny_bert")
    out = root / "run"
    check(run(python_cmd(*small(model, out, "--max_steps", str(STEPS), "--save_interval", str(SAVE)))))
    return model, out


def rewound(src: Path, dst: Path, step: int) -> None:
    """The run as a crash after step ``step``'s checkpoint but before later ones would leave it:
    later checkpoints gone, 'latest' at ``step``, metrics.jsonl still holding the later records."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name != f"step_{step:07d}":
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:07d}")


def test_resume_keeps_one_record_per_step_and_clears_the_marker(finished, tmp_path):
    model, out = finished
    resumed = tmp_path / "resumed"
    rewound(out, resumed, SAVE)
    (resumed / "preempted.json").write_text(json.dumps({"step": SAVE}))
    assert max(r["step"] for r in records(resumed, "train")) == STEPS  # the discarded future is still there
    check(run(python_cmd(*small(model, resumed, "--max_steps", str(STEPS), "--save_interval", str(SAVE),
                                "--resume", "latest"))))
    steps = [r["step"] for r in records(resumed, "train")]
    assert steps == list(range(1, STEPS + 1))  # strictly increasing, nothing twice
    evals = [r["step"] for r in records(resumed, "eval")]
    assert evals == sorted(set(evals))
    all_steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert all_steps == sorted(all_steps)
    expected, got = train_losses(out), train_losses(resumed)
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-7) for s in range(SAVE + 1, STEPS + 1))
    assert not (resumed / "preempted.json").exists()


@pytest.mark.parametrize("damaged", ["rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "experts_ep0.safetensors"])
def test_a_damaged_checkpoint_is_named_with_the_good_one(finished, tmp_path, damaged):
    model, out = finished
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    latest = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    victim = next(latest.rglob(damaged))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a write cut short
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    args = small(model, run_dir, "--max_steps", str(STEPS + 4), "--save_interval", str(SAVE))
    proc = run(python_cmd(*args, "--resume", "latest"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    good = run_dir / "checkpoints" / f"step_{SAVE:07d}"
    assert str(victim) in message and f"--resume {good}" in message and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    proc = check(run(python_cmd(*args, "--resume", str(good))))
    assert f"resumed from {good} at step {SAVE}" in proc.stdout


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_reaches_the_ranks(tmp_path, launcher):
    model = write_tiny_bert(tmp_path / "tiny_bert")
    out = tmp_path / "run"
    cmd = (deepspeed_cmd if launcher == "deepspeed" else torchrun_cmd)(
        2, *small(model, out, "--max_steps", "100000", "--save_interval", "0", "--eval_interval", "0"))
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and records(out, "train")):
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(1)
        assert records(out, "train"), "training never started"
        ranks = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # to the launcher alone, as `kill <pid>` does
        gone, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, f"still running: {[p.pid for p in alive]}"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "launcher.log").read_text()
    marker = json.loads((out / "preempted.json").read_text())
    ckpt = out / "checkpoints" / f"step_{marker['step']:07d}"
    assert marker["checkpoint"] == str(ckpt) and (ckpt / "trainer_state.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == ckpt.name
    assert text.count("stopped: stop requested by signal") == 2, text[-3000:]  # both ranks took the exit-75 path
