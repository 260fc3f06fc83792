"""The real deepspeed launcher, 2 gloo ranks, ZeRO-3 (slow: ~2 minutes)."""

import json
import shutil

import pytest

from tests.helpers.launch_utils import (
    SMALL_RUN,
    check,
    copy_run_at,
    deepspeed_cmd,
    records,
    run,
    torchrun_cmd,
    train_losses,
)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 24, 12


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "run"
    args = ["--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", str(STEPS),
            "--save_interval", str(SAVE_AT), *SMALL_RUN]
    proc = check(run(deepspeed_cmd(2, *args)))
    return out, args, proc


def test_no_shared_memory_is_left_behind(zero3_run):
    """DeepSpeed's CPU all-reduce maps one ~64 MB /dev/shm file per rank and never unlinks it; the
    trainer does at exit (before, every launch leaked them until RAM ran out)."""
    import os
    from pathlib import Path

    _, _, proc = zero3_run
    port = proc.args[proc.args.index("--master_port") + 1]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, left


def test_loss_falls(zero3_run):
    out, _, _ = zero3_run
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < first - 0.05, f"loss did not fall: first {first:.4f}, last {last:.4f}"


def test_base_is_partitioned_across_ranks(zero3_run):
    out, _, proc = zero3_run
    memory = records(out, "memory")[0]
    assert memory["zero_stage"] == 3
    per_rank = memory["per_rank"]
    assert sorted(per_rank) == ["0", "1"]
    for b in per_rank.values():
        ratio = b["frozen_local"] / b["frozen_full"]
        assert 0.45 <= ratio <= 0.55, f"rank holds {ratio:.3f} of the frozen base, expected about half"
        assert b["experts_local"] > 0
    assert "rank 1: frozen base" in proc.stdout


def test_logs_read_well_in_a_file(zero3_run):
    """No progress bar in a file, so every log line says how far along the run is; no terminal colour
    codes; the new task head is announced once (rank 0), not once per rank."""
    _, _, proc = zero3_run
    text = proc.stdout + proc.stderr
    assert "\x1b[" not in text
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("[step ") and "task_loss" in ln]
    assert steps and all(" elapsed " in ln and " eta " in ln for ln in steps)
    assert text.count("newly initialized") == 1 and "classifier.weight" in text


def test_outputs_written(zero3_run):
    out, _, _ = zero3_run
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["adapter"]["method"] == "adamole" and adapter["task_type"] == "seq_cls"
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:07d}"
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["total"] == 48 and 0.0 <= final["accuracy"] <= 1.0
    assert not list(out.rglob(".tmp_*")), "temporary checkpoint directories left behind"


def test_resume_gives_the_same_next_step_loss(zero3_run, tmp_path):
    """Resume under torchrun from the mid-run checkpoint: the following losses match exactly."""
    out, args, _ = zero3_run
    resumed = tmp_path / "resumed"
    copy_run_at(out, resumed, SAVE_AT)
    args = [a if a != str(out) else str(resumed) for a in args]
    proc = check(run(torchrun_cmd(2, *args, "--resume", "latest")))
    assert f"resumed from {resumed / 'checkpoints' / f'step_{SAVE_AT:07d}'}" in proc.stdout
    expected, got = train_losses(out), train_losses(resumed)
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    shutil.rmtree(resumed)
