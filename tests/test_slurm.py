"""The project's sbatch script on a real single-node SLURM cluster (munged, slurmctld, slurmd
started here): a 2-task CPU run completes with its checkpoint and metrics, and a run stopped
by SIGTERM checkpoints, requeues itself and resumes to the end."""

import json
import sys
import time
from pathlib import Path

import pytest
from launch_utils import REPO, records
from slurm_cluster import SlurmCluster, missing_tools

pytestmark = pytest.mark.slow

RECIPE = """\
max_train_examples: 400
max_eval_examples: 32
micro_batch_size: 4
max_length: 32
lr: 0.003
log_interval: 1
eval_interval: 0
eval_at_start: false
method: adamole
num_experts: 8
rank: 4
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"SLURM TEST SKIPPED: {', '.join(missing)} not installed (.ci/run installs slurm-wlm and munge "
                    "with apt-get where it can)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, tmp_path, *train_flags) -> tuple[str, Path, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out_dir = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    env = (f"ALL,ADAMOLE_VENV={Path(sys.executable).parents[1]},HF_HUB_OFFLINE=1,OUTPUT_DIR={out_dir},"
           "OMP_NUM_THREADS=1,PYTHONUNBUFFERED=1")
    proc = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--chdir={REPO}",
                       f"--output={log}", f"--export={env}", str(REPO / "launch/slurm/train.sbatch"), str(recipe),
                       *train_flags)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, out_dir, Path(str(log).replace("%j", job_id))


def test_two_task_run_completes(cluster, tmp_path):
    job_id, out_dir, log = submit(cluster, tmp_path, "--max_steps", "6", "--save_interval", "3")
    job = cluster.wait_job(job_id, timeout=420)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert "2 tasks" in text
    assert [r["step"] for r in records(out_dir, "train")] == list(range(1, 7))
    memory = records(out_dir, "memory")[0]
    assert sorted(memory["per_rank"]) == ["0", "1"]  # two ranks, through srun
    assert (out_dir / "checkpoints" / "latest").read_text() == "step_0000006"
    assert (out_dir / "checkpoints" / "step_0000006" / "trainer_state.json").is_file()
    assert json.loads((out_dir / "final_metrics.json").read_text())["total"] == 32


def test_sigterm_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 40
    job_id, out_dir, log = submit(cluster, tmp_path, "--max_steps", str(steps), "--save_interval", "1000")
    metrics = out_dir / "metrics.jsonl"
    cluster.wait_until(lambda: metrics.exists() and len(records(out_dir, "train")) >= 3, 300, "training to start")
    assert cluster.run("scancel", "--signal=TERM", job_id).returncode == 0  # what --signal=TERM@120 sends
    job = cluster.wait_job(job_id, timeout=600)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert int(job["Restarts"]) == 1
    assert "requeueing job" in text and "restart 1" in text
    stopped = int(text.split("] stop signal received")[0].rsplit("[step ", 1)[1])
    assert 3 <= stopped < steps
    # the requeue follows the trainer's marker (srun's exit code races under --kill-on-bad-exit),
    # and the script clears it before the restart's srun
    assert f'"step": {stopped}' in text.split("requeueing job")[0].rsplit("stopped by signal", 1)[1]
    assert not (out_dir / "preempted.json").exists()
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped}" in text
    train_steps = [r["step"] for r in records(out_dir, "train")]
    assert train_steps[-1] == steps
    assert sorted(set(train_steps)) == list(range(1, steps + 1))  # nothing skipped across the requeue
    time.sleep(0.1)


def test_scaling_sbatch_appends_records(cluster, tmp_path):
    out = tmp_path / "scaling.json"
    env = (f"ALL,ADAMOLE_VENV={Path(sys.executable).parents[1]},HF_HUB_OFFLINE=1,SCALING_JSON={out},STEPS=2,"
           "BATCH=4,OMP_NUM_THREADS=1")
    proc = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--chdir={REPO}",
                       f"--output={tmp_path}/scaling-%j.out", f"--export={env}",
                       str(REPO / "launch/slurm/scaling.sbatch"))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    job = cluster.wait_job(job_id, timeout=600)
    log = (tmp_path / f"scaling-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    recs = json.loads(out.read_text())
    assert sorted((r["mode"], r["ep_size"]) for r in recs) == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    assert all(r["world"] == 2 and r["nodes"] == 1 and r["tokens_per_s"] > 0 for r in recs)
    assert (tmp_path / "scaling.csv").read_text().count("\n") == 5  # header + 4 rows
