"""Running it for real: mpirun, the deepspeed launcher with a hostfile, wandb offline, a dead
rank, a non-finite loss, and the plot command on a real run's metrics."""

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch_utils import (
    BIN,
    MINILM_JOB,
    REPO,
    SMALL_RUN,
    TRAIN,
    check,
    free_port,
    launch_env,
    python_cmd,
    records,
    run,
)

pytestmark = pytest.mark.slow

SHORT = [*MINILM_JOB, "--max_steps", "4", "--no-eval_at_start", *SMALL_RUN]  # TRAIN run without the cmd helpers


def test_mpirun_two_ranks(tmp_path):
    out = tmp_path / "run"
    proc = check(run([str(BIN / "mpiexec"), "-n", "2", sys.executable, TRAIN, "--output_dir", str(out), *SHORT]))
    memory = records(out, "memory")[0]
    assert sorted(memory["per_rank"]) == ["0", "1"]
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    assert "rank 1: frozen base" in proc.stdout


def test_deepspeed_hostfile_on_localhost(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    # One host: DeepSpeed launches locally; --no_ssh_check/--master_addr skip the ssh probe that a
    # real multi-node hostfile needs (passwordless ssh to every host, see README).
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN,
           "--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), *SHORT]
    check(run(cmd))
    assert sorted(records(out, "memory")[0]["per_rank"]) == ["0", "1"]


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    from tests.helpers.wandb_log import history

    out = tmp_path / "run"
    check(run([sys.executable, TRAIN, "--output_dir", str(out), "--report_to", "wandb", *SHORT,
               "--eval_interval", "2"]))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = history(next(runs[0].glob("run-*.wandb")))
    logged = {r["_step"]: r for r in rows}
    ours = {r["step"]: r for r in records(out, "train")}
    assert set(ours) <= set(logged)
    for step, rec in ours.items():
        assert logged[step]["train/task_loss"] == pytest.approx(rec["task_loss"])
        assert logged[step]["train/aux_loss"] == pytest.approx(rec["aux_loss"])
        assert "train/mean_active_experts" in logged[step] and "train/lr" in logged[step]
    assert logged[4]["eval/accuracy"] == pytest.approx(records(out, "eval")[-1]["accuracy"])


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run(python_cmd("--output_dir", str(out), *SMALL_RUN, "--lr", "1e30", "--max_grad_norm", "0",
                          "--warmup_steps", "0", "--save_interval", "1", "--max_steps", "30", "--no-eval_at_start"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss or gradient at step ")
    step = int(message.split("at step ")[1].split()[0])
    assert f"last good checkpoint: {out / 'checkpoints' / f'step_{step - 1:07d}'}" in message
    assert (out / "checkpoints" / f"step_{step - 1:07d}" / "trainer_state.json").is_file()


def test_dead_rank_stops_the_others_naming_it(tmp_path):
    """Two ranks started by hand (no launcher to kill the survivors): SIGKILL rank 1 mid-run;
    rank 0 must exit within the peer timeout, naming rank 1."""
    out = tmp_path / "run"
    env = launch_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            python_cmd("--output_dir", str(out), "--max_steps", "500", "--peer_timeout", "10", "--no-eval_at_start",
                       *SMALL_RUN),
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(1)
        while time.monotonic() < deadline and len(records(out, "train")) < 2:
            time.sleep(1)
        assert procs[0].poll() is None, "rank 0 ended before the test could kill rank 1"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rc = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    text = (tmp_path / "rank0.log").read_text()
    assert rc == 76, text[-3000:]
    assert "rank 1 stopped responding" in text or "rank 1 failed" in text
    assert elapsed < 45


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    # mean pooling: the adapter must record it for eval.py to rebuild the same head
    check(run(python_cmd("--output_dir", str(out), "--max_steps", "4", *SMALL_RUN, "--eval_interval", "2",
                         "--pooling", "mean")))
    return out


def test_eval_command_reproduces_the_runs_final_accuracy(trained_run, tmp_path):
    """launch/eval.py loads the saved adapter onto a fresh base (no DeepSpeed), pooled as in
    training, and gets the accuracy the ZeRO-3 run measured on the same examples."""
    assert json.loads((trained_run / "adapter" / "adapter_config.json").read_text())["pooling"] == "mean"
    report = tmp_path / "eval.json"
    proc = check(run([sys.executable, str(REPO / "launch" / "eval.py"), "--adapter", str(trained_run / "adapter"),
                      "--max_examples", "48", "--json", str(report)]))
    final = json.loads((trained_run / "final_metrics.json").read_text())
    got = json.loads(report.read_text())
    assert got["total"] == final["total"] == 48
    assert got["correct"] == final["correct"]
    assert "accuracy" in proc.stdout and got["layers"]


def test_plot_command_renders_pngs_from_a_real_run(trained_run):
    out = trained_run
    proc = check(run([sys.executable, str(REPO / "launch" / "plot.py"), str(out)]))
    names = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert names == ["active_experts.png", "expert_load.png", "loss.png"]
    for name in names:
        w, h = png_size(out / "plots" / name)
        assert w > 200 and h > 200
    assert proc.stdout.count("wrote ") == 3
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.image import imread

    heat = imread(out / "plots" / "expert_load.png")
    assert heat.std() > 0.01  # not a blank canvas
