"""The project's sbatch scripts on a real SLURM cluster started here (munged, slurmctld and one
slurmd per emulated node, 4 nodes on this machine: tests/helpers/slurm_cluster.py): a 2-task CPU run
completes with its checkpoint and metrics; a run stopped by SIGTERM checkpoints, requeues itself
and resumes to the end; a run across 2 nodes splits the experts between them (ep_size 2); the
scaling script appends its records."""

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch_utils import REPO, records, train_losses
from tests.helpers.slurm_cluster import SlurmCluster, missing_tools
from tests.helpers.tiny_models import write_tiny_bert

pytestmark = pytest.mark.slow
NODES = 4  # emulated nodes in the test cluster

RECIPE = """\
model: minilm-l6
dataset: builtin:word_categories
autocast: none
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
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=NODES).start()
    yield c
    c.stop()


def submit(cluster, tmp_path, *train_flags, nodes: int = 1, tasks_per_node: int = 2) -> tuple[str, Path, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out_dir = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    env = (f"ALL,ADAMOLE_VENV={Path(sys.executable).parents[1]},HF_HUB_OFFLINE=1,OUTPUT_DIR={out_dir},"
           "OMP_NUM_THREADS=1,PYTHONUNBUFFERED=1")
    proc = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                       f"--chdir={REPO}", f"--output={log}", f"--export={env}", str(REPO / "launch/slurm/train.sbatch"),
                       str(recipe), *train_flags)
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


def test_cluster_has_the_emulated_nodes(cluster):
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
    assert out[0::2] == [f"adamole-n{i}" for i in range(1, NODES + 1)] and set(out[1::2]) == {"idle"}


def test_two_node_run_splits_the_experts_across_nodes(cluster, tmp_path):
    """One rank per node, ep_size 2: each node holds half the experts and tokens cross between
    nodes; the rendezvous is the first node's NodeAddr (its name does not resolve here)."""
    job_id, out_dir, log = submit(cluster, tmp_path, "--max_steps", "4", "--save_interval", "4", "--ep_size", "2",
                                  nodes=2, tasks_per_node=1)
    job = cluster.wait_job(job_id, timeout=480)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert job["NumNodes"] == "2" and job["NodeList"] in ("adamole-n[1-2]", "adamole-n[2-3]", "adamole-n[3-4]")
    assert f"2 node(s), 2 tasks, master {cluster.host}:" in text
    train = records(out_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["a2a_bytes_per_step"] > 0 for r in train)  # tokens crossed between the nodes
    shards = sorted(p.name for p in (out_dir / "checkpoints" / "step_0000004").glob("experts_ep*.safetensors"))
    assert shards == ["experts_ep0.safetensors", "experts_ep1.safetensors"]


def test_preempted_two_node_job_resumes_to_the_uninterrupted_loss(cluster, tmp_path):
    """A 2-node expert-parallel job is preempted (SIGTERM to every task), checkpoints, requeues and
    resumes — wherever the scheduler puts it — and ends with the same losses as the same job left
    alone (which runs beside it on the other two nodes)."""
    steps, flags = 16, ("--save_interval", "1000", "--ep_size", "2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    alone_id, alone_dir, alone_log = submit(cluster, tmp_path / "a", "--max_steps", str(steps), *flags, nodes=2,
                                            tasks_per_node=1)
    job_id, out_dir, log = submit(cluster, tmp_path / "b", "--max_steps", str(steps), *flags, nodes=2,
                                  tasks_per_node=1)
    cluster.wait_until(lambda: (out_dir / "metrics.jsonl").exists() and len(records(out_dir, "train")) >= 3, 300,
                       "training to start")
    assert cluster.run("scancel", "--signal=TERM", job_id).returncode == 0
    job, alone = cluster.wait_job(job_id, timeout=600), cluster.wait_job(alone_id, timeout=600)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert alone["JobState"] == "COMPLETED", alone_log.read_text()[-3000:]
    assert int(job["Restarts"]) == 1 and "requeueing job" in text and "2 node(s)" in text.split("restart 1")[1]
    stopped = int(text.split("] stop signal received")[0].rsplit("[step ", 1)[1])
    assert 3 <= stopped < steps
    expected, got = train_losses(alone_dir), train_losses(out_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(stopped + 1, steps + 1):  # after the resume, step for step
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_preempted_two_node_job_resumes_on_one_node_with_twice_the_accumulation(cluster, tmp_path):
    """A 2-node job (one task each) is preempted while the other nodes drain; requeued, it waits for two
    nodes until its request is changed to the one node left (scontrol update, as a user or an operator
    would), starts there, runs one task on it (train.sbatch counts the tasks of the nodes it got), and
    resumes with twice the accumulation (the checkpoint's global
    batch kept), ending with the losses of the same job left alone on 2 ranks beside it. Dropout off:
    its masks are drawn per rank (the tiny BERT's own dropout is off too, unlike MiniLM's). The tiny BERT's steps
    are short: 30 of them leave the drain and the signal time to land before the end (with 12, a CI run finished
    every step first)."""
    steps = 30
    model = write_tiny_bert(tmp_path / "tiny_bert")
    flags = ("--max_steps", str(steps), "--save_interval", "1000", "--dropout", "0", "--model", str(model))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    job_id, out_dir, log = submit(cluster, tmp_path / "b", *flags, nodes=2, tasks_per_node=1)
    alone_id, alone_dir, alone_log = submit(cluster, tmp_path / "a", *flags, nodes=1, tasks_per_node=2)
    cluster.wait_until(lambda: (out_dir / "metrics.jsonl").exists() and len(records(out_dir, "train")) >= 3, 300,
                       "training to start")
    kept = cluster.run("scontrol", "show", "hostnames", cluster.job(job_id)["NodeList"]).stdout.split()[0]
    drained = [node for node in cluster.nodes if node != kept]  # running jobs finish on a draining node
    try:
        for node in drained:
            cluster.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=elastic-test", check=True)
        assert cluster.run("scancel", "--signal=TERM", job_id).returncode == 0
        cluster.wait_until(lambda: cluster.job(job_id)["JobState"] == "PENDING" and cluster.job(job_id)["Restarts"]
                           == "1", 300, "the requeued job to wait for nodes")
        cluster.run("scontrol", "update", f"jobid={job_id}", "NumNodes=1", "NumTasks=1", check=True)
        job, alone = cluster.wait_job(job_id, timeout=600), cluster.wait_job(alone_id, timeout=600)
    finally:
        for node in drained:
            cluster.run("scontrol", "update", f"nodename={node}", "state=resume")
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    assert alone["JobState"] == "COMPLETED", alone_log.read_text()[-3000:]
    before, again = text.split("(restart 1)")
    assert "2 node(s), 2 tasks" in before and again.startswith(": 1 node(s), 1 tasks"), text[-3000:]
    assert "micro batch 4 x world 2 x accumulation 1 -> micro batch 4 x world 1 x accumulation 2" in again
    stopped = int(before.split("] stop signal received")[0].rsplit("[step ", 1)[1])
    assert 3 <= stopped < steps
    expected, got = train_losses(alone_dir), train_losses(out_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(stopped + 1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"


def test_a_lost_node_is_named_and_the_job_resumes_on_the_nodes_still_up(cluster, tmp_path):
    """One node of a 2-node job dies (its slurmd, step daemon and task SIGKILLed). The rank left
    exits 76 naming the lost rank within --peer_timeout; SLURM cancels the job for the node failure
    and, since train.sbatch asks for --requeue, starts it again on nodes still up, where it resumes
    from ``latest`` (a complete checkpoint) and finishes every step."""
    steps = 12
    flags = ("--save_interval", "2", "--ep_size", "2", "--peer_timeout", "20")
    job_id, out_dir, log = submit(cluster, tmp_path, "--max_steps", str(steps), *flags, nodes=2, tasks_per_node=1)
    # a checkpoint of step 4 or later complete (renamed into place whole), not only step 4 logged: a step's
    # record is written before its checkpoint, so a kill between the two would resume from step 2
    def checkpointed_past_step_2() -> bool:
        return any(int(state.parent.name.split("_")[1]) >= 4
                   for state in (out_dir / "checkpoints").glob("step_*/trainer_state.json"))

    cluster.wait_until(checkpointed_past_step_2, 300, "training to pass a checkpoint")
    nodes = cluster.run("scontrol", "show", "hostnames", cluster.job(job_id)["NodeList"]).stdout.split()
    lost = nodes[1]
    try:
        assert cluster.kill_node(lost, job_id)  # rank 1's task was found and killed
        job = cluster.wait_job(job_id, timeout=480)
    finally:
        cluster.start_node(lost)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", text[-3000:]
    first, again = text.split("(restart 1)")
    assert "rank 1 stopped responding" in first and "exiting (exit code 76)" in first
    assert f"{nodes[0]}: task 0: Exited with exit code 76" in first, first[-3000:]
    # the job's output names the node failure in srun's words, slurmstepd's or both (slurmstepd's cancel line races with
    # the batch script's exit after srun returns); the controller's log always says why the job was requeued
    assert f"Node failure on {lost}" in first or "DUE TO NODE FAILURE" in first, first[-3000:]
    assert f"requeue job JobId={job_id} due to failure of node {lost}" in cluster.controller_log()
    assert int(job["Restarts"]) == 1
    assert lost not in cluster.run("scontrol", "show", "hostnames", job["NodeList"]).stdout.split()
    resumed = int(again.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 4 and resumed % 2 == 0  # the newest complete checkpoint before the loss
    assert sorted({r["step"] for r in records(out_dir, "train")}) == list(range(1, steps + 1))
    cluster.wait_until(lambda: cluster.idle_nodes() == NODES, 120, "the lost node to come back")


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
