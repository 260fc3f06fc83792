"""Faults an operator meets, end to end through launch/train.py (tiny BERT, gloo):

* a resume discards the records of the steps after its checkpoint (metrics.jsonl stays one record
  per step) and clears the preempted marker;
* a damaged checkpoint is named, file and all, with the newest good one, and nothing is touched;
  resuming from the good one works; so is one missing a file its manifest names;
* two runs started at once into one output dir: one runs, the other is refused (the dir's lock);
* SIGTERM to the ``deepspeed`` runner (which dies at once without telling its children) still
  reaches the ranks: they checkpoint, write preempted.json and exit 75, none is left running;
  SIGTERM to torchrun does the same;
* a second Ctrl-C still ends in a checkpoint and exit 75, without a traceback;
* a stop signal to one rank during a long evaluation: every rank leaves it at the same batch,
  checkpoints and exits 75; the resumed run does the evaluation it owes first;
* (issue 40) a stop while the data is tokenized -- by a chat template that loops -- ends the run at once
  (exit 75, one line, no temporary cache folder); a disk that fills up during a checkpoint ends it with
  exit 74 and one line, the partial checkpoint removed and the previous one byte for byte intact; a
  resume on training data edited in place is refused (or allowed, with a warning); Ctrl-C or SIGTERM to
  eval.py and generate.py ends them with one line and exit 130, nothing half-written, and Ctrl-C during a
  --chat reply stops the reply, not the chat.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.launch_utils import (
    REPO,
    check,
    deepspeed_cmd,
    launch_env,
    python_cmd,
    records,
    run,
    torchrun_cmd,
    train_losses,
)
from tests.helpers.tiny_models import write_tiny_bert

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


@pytest.mark.parametrize("deleted", ["experts_ep0.safetensors", "rng_rank0.pt"])
def test_a_checkpoint_missing_a_file_is_named_with_the_good_one(finished, tmp_path, deleted):
    """A file of the checkpoint deleted after it was complete (its trainer_state.json still there):
    refused before anything loads, naming the file, with the newest complete checkpoint."""
    model, out = finished
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    latest = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    victim = latest / deleted
    victim.unlink()
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    args = small(model, run_dir, "--max_steps", str(STEPS + 4), "--save_interval", str(SAVE))
    proc = run(python_cmd(*args, "--resume", "latest"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    good = run_dir / "checkpoints" / f"step_{SAVE:07d}"
    assert message == (f"error: --resume: checkpoint {latest} is incomplete: {victim} is missing (named in its "
                       f"manifest.json); the newest other complete checkpoint is {good} (--resume {good})")
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_two_runs_started_at_once_into_one_new_dir(finished, tmp_path):
    """One of them runs, the other is refused (exit 2, one line) whenever it gets there: while the
    first holds the lock, or after it finished (then the dir holds a run); the run is one run's."""
    model, _ = finished
    out = tmp_path / "run"
    cmd = python_cmd(*small(model, out, "--max_steps", "6", "--save_interval", "2"))
    procs = [subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    refused = next(err for code, _, err in results if code == 2)
    assert "Traceback" not in refused
    last = refused.strip().splitlines()[-1]
    assert last.startswith(f"error: output_dir ({out}) ") and ("is in use by the run of pid" in last
                                                               or "already holds a run" in last), last
    assert [r["step"] for r in records(out, "train")] == list(range(1, 7))
    assert not (out / ".run.lock").exists()


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


def wait_for(proc: subprocess.Popen, log: Path, ready, what: str, limit_s: float = 300) -> None:
    """Poll until ``ready()`` (the run dies first: fail with its log)."""
    deadline = time.time() + limit_s
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{what} never happened\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def has_train_record(out: Path, step: int = 1):
    return lambda: (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(out, "train"))


def test_a_second_ctrl_c_still_checkpoints_quietly(tmp_path):
    """Two SIGINTs 0.2 s apart (an impatient operator; torchrun also forwards the terminal's one to ranks
    that got it already): exit 75 with a checkpoint and the marker, no KeyboardInterrupt, whether the
    second lands during the stop (a note: tests/unit/train/test_training_utils.py) or after it, as the interpreter
    shuts down (ignored; it used to kill the process or raise in an exit hook)."""
    model = write_tiny_bert(tmp_path / "tiny_bert")
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(python_cmd(*small(model, out, "--max_steps", "100000", "--save_interval", "0",
                                                  "--eval_interval", "0")),
                                env=launch_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(proc, log_path, has_train_record(out), "training")
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            assert proc.poll() is None, "gone before the second Ctrl-C"
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 75, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["signal"] == "SIGINT" and (Path(marker["checkpoint"]) / "trainer_state.json").is_file()


def mc_dataset(folder: Path, train: int, test: int) -> Path:
    def rows(n: int) -> list[dict]:
        return [{"question": f"Which of these is item number {i}?", "choices": ["apple", "hammer", "nurse", "wagon"],
                 "answerKey": "ABCD"[i % 4]} for i in range(n)]

    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(rows(train)))
    (folder / "test.json").write_text(json.dumps(rows(test)))
    return folder


def test_a_stop_during_a_long_evaluation_checkpoints_at_a_batch_boundary(tmp_path):
    """SIGTERM to rank 1 alone once step 2's evaluation (600 examples, one per batch) has begun: both
    ranks leave it at the same batch, far from its end, checkpoint step 2 and exit 75. --resume latest
    first does the evaluation it owes, then trains on."""
    model = write_tiny_bert(tmp_path / "tiny_bert")
    data = mc_dataset(tmp_path / "data", train=64, test=600)
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    args = small(model, out, "--dataset", str(data), "--max_eval_examples", "600", "--eval_batch_size", "1",
                 "--eval_interval", "2", "--save_interval", "0", "--max_steps", "3")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun_cmd(2, *args), env=launch_env(), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(proc, log_path, lambda: len(descendants(proc.pid)) >= 2, "the ranks' start")
            wait_for(proc, log_path, has_train_record(out, step=2), "step 2")  # its evaluation follows at once
            rank1 = next(p for p in descendants(proc.pid) if p.environ().get("RANK") == "1")
            rank1.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                import os

                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert text.count("stopped: stop requested by signal") == 2, text[-3000:]  # both ranks exited 75
    done, total = map(int, re.search(r"\[step 2\] stop signal: evaluation stopped after batch (\d+)/(\d+)",
                                     text).groups())
    assert total == 300 and done < total // 2, (done, total)  # left mid-evaluation, not after it
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == 2 and marker["checkpoint"] == str(out / "checkpoints" / "step_0000002")
    state = json.loads((out / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["evaluation_owed"] is True
    assert not records(out, "eval")  # the interrupted evaluation logged nothing
    proc = run(torchrun_cmd(2, *args, "--resume", "latest"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["step"] for r in records(out, "eval")] == [2, 3]  # the owed one, then the final one
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    assert all(r["total"] == 600 for r in records(out, "eval"))


# -- issue 40 ----------------------------------------------------------------------------------------------
LOOPING_TEMPLATE = ("{% for m in messages %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                    "{% if add_generation_prompt %}assistant :{% endif %}")
CHAT = {"messages": [{"role": "user", "content": "what color is the sky"},
                     {"role": "assistant", "content": "the sky is blue"}]}


def wait_for_text(proc: subprocess.Popen, log: Path, text: str) -> None:
    wait_for(proc, log, lambda: text in log.read_text(), repr(text))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_tokenizing_ends_the_run_at_once(tmp_path, sig):
    """Case 7: a chat template that loops inside tokenisation never reaches a step boundary, where the stop
    flag was read: SIGTERM and SIGINT were ignored and a .tmp folder stayed in the cache. Now: exit 75 with
    one line naming the phase, the cache's temporary folder removed, the output dir never created."""
    from tests.helpers.tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "model")
    (tmp_path / "loop.jinja").write_text(LOOPING_TEMPLATE)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text((json.dumps(CHAT) + "\n") * 8)
    cache, out, log_path = tmp_path / "cache", tmp_path / "run", tmp_path / "run.log"
    env = {**launch_env(), "ADAMOLE_DIST_CACHE": str(cache)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(python_cmd("--model", str(model), "--dataset", str(data), "--output_dir", str(out),
                                           "--chat_template", str(tmp_path / "loop.jinja"), "--max_steps", "1"),
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_text(proc, log_path, "tokenizing 8 records")
            assert list((cache / "tokenized").glob(".*.tmp-*")), "the build's temporary folder is not there yet"
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 75, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == (
        f"stopped: stop requested by signal ({sig.name}) while reading and tokenizing the data; nothing was written "
        "to output_dir and no checkpoint exists yet: run the same command again to start")
    assert [p.name for p in (cache / "tokenized").iterdir()] == [] and not out.exists()


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of ``size`` bytes (root only: skipped elsewhere), unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_a_full_disk_during_a_checkpoint(tmp_path, small_disk, disk):
    """Case 13: the disk fills up while a checkpoint is written: one line naming the step, the error and the
    intact previous checkpoint, exit 74; the partial checkpoint removed at once (a .tmp_step_* stayed until
    the next save); the previous checkpoint and 'latest' byte for byte as they were. "tmpfs" fills a real
    small filesystem (as root); "injected" makes safetensors' writer fail with ENOSPC after half a file
    (tests/helpers/fault_hooks), which needs no privileges."""
    from tests.helpers.fault_hooks import env_with

    model = write_tiny_bert(tmp_path / "tiny_bert")
    out = tmp_path / "run"
    check(run(python_cmd(*small(model, out, "--max_steps", "2", "--save_interval", "0"))))
    checkpoint = out / "checkpoints" / "step_0000002"
    if disk == "tmpfs":  # room for the run and half a checkpoint more (a tmpfs holds files in whole pages)
        def pages(folder: Path) -> int:
            return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())

        out = small_disk(pages(out) + pages(checkpoint) // 2 + 16 * 1024) / "run"
        shutil.copytree(tmp_path / "run", out)
        checkpoint = out / "checkpoints" / "step_0000002"
    before = {"checkpoint": snapshot(checkpoint), "latest": (out / "checkpoints" / "latest").read_bytes()}
    env = env_with(ADAMOLE_TEST_ENOSPC_AFTER="0") if disk == "injected" else launch_env()
    proc = subprocess.run(python_cmd(*small(model, out, "--max_steps", "4", "--save_interval", "1", "--resume",
                                            "latest")), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the checkpoint of step 3 could not be written to {out / 'checkpoints'} (")
    # safetensors and DeepSpeed's torch.save word a full disk differently; the free space says it either way
    assert "No space left on device" in last or " 0 MiB free on its filesystem" in last, last
    assert f"the previous checkpoint, {checkpoint}, and 'latest' are intact" in last and "--resume latest" in last
    assert {"checkpoint": snapshot(checkpoint), "latest": (out / "checkpoints" / "latest").read_bytes()} == before
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_0000002"]


def test_resume_on_training_data_edited_in_place(tmp_path):
    """Case 12: 30 of 40 records edited, and the resume went on with exit 0 and no word (the resume check
    compared the dataset's path only). Refused by default, naming the file, the run byte for byte as it
    was; --allow_data_change continues with a warning."""
    model = write_tiny_bert(tmp_path / "tiny_bert")
    data = mc_dataset(tmp_path / "data", train=40, test=8)
    out = tmp_path / "run"
    args = small(model, out, "--dataset", str(data), "--max_train_examples", "0", "--save_interval", "2")
    check(run(python_cmd(*args, "--max_steps", "2")))
    rows = json.loads((data / "train.json").read_text())
    for row in rows[:30]:
        row["answerKey"] = "ABCD"[("ABCD".index(row["answerKey"]) + 1) % 4]
    (data / "train.json").write_text(json.dumps(rows))
    before = snapshot(out)
    proc = run(python_cmd(*args, "--max_steps", "4", "--resume", "latest"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume: the training data {data / 'train.json'} changed since this run started")
    assert "--allow_data_change" in last and snapshot(out) == before
    proc = check(run(python_cmd(*args, "--max_steps", "4", "--resume", "latest", "--allow_data_change")))
    assert f"the training data {data / 'train.json'} changed since this run started" in proc.stderr
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]


def tiny_chat_adapter(tmp_path: Path) -> Path:
    from tests.helpers.saved_adapters import CHAT_TEMPLATE, write_adapter_dir
    from tests.helpers.tiny_models import write_tiny_llama

    return write_adapter_dir(tmp_path / "adapter", write_tiny_llama(tmp_path / "llama"), "lora", rank=2,
                             meta={"prompt_format": "chat", "chat_template": CHAT_TEMPLATE})


def sigint_as_on_a_terminal() -> None:
    """For a command's process, before it starts: SIGINT at its default, as a terminal's Ctrl-C finds it. A
    runner started as a background job of a non-interactive shell has SIGINT ignored, which its children
    inherit and Python then keeps (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(cmd: list[str], tmp_path: Path, sig: int) -> tuple[int, str]:
    """``cmd`` run with every causal-LM forward slowed; ``sig`` sent once the first forward began."""
    from tests.helpers.fault_hooks import env_with

    started, log_path = tmp_path / "started", tmp_path / "cmd.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env_with(ADAMOLE_TEST_SLOW_FORWARD="2", ADAMOLE_TEST_STARTED=str(started)),
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=sigint_as_on_a_terminal)
        try:
            wait_for(proc, log_path, started.exists, "the first forward")
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, log_path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_eval_and_generate_stop_with_one_line_and_nothing_half_written(tmp_path, sig):
    """Cases 1, 8, 11: Ctrl-C in eval.py or generate.py was a traceback, and generate's --out was opened
    (emptied) before the work: now exit 130, one line, --json not written, an existing --out byte for byte
    as it was and no temporary file beside it."""
    adapter = tiny_chat_adapter(tmp_path)
    what = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    result = tmp_path / "result.json"
    code, text = interrupted([sys.executable, str(REPO / "launch" / "eval.py"), "--adapter", str(adapter),
                              "--dataset", "builtin:word_categories", "--max_examples", "4", "--json", str(result)],
                             tmp_path, sig)
    assert code == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == f"stopped: interrupted by {what}; no output was left half-written"
    assert not result.exists()
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one", "two", "three")))
    out.write_text('{"completion": "from an earlier run"}\n')
    (tmp_path / "started").unlink()
    code, text = interrupted([sys.executable, str(REPO / "launch" / "generate.py"), "--adapter", str(adapter),
                              "--prompts", str(prompts), "--out", str(out), "--batch_size", "1", "--device", "cpu",
                              "--max_new_tokens", "3"], tmp_path, sig)
    assert code == 130 and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == f"stopped: interrupted by {what}; no output was left half-written"
    assert out.read_text() == '{"completion": "from an earlier run"}\n'
    assert sorted(p.name for p in tmp_path.glob("*out.jsonl*")) == ["out.jsonl"]


def test_ctrl_c_during_a_chat_reply_stops_the_reply_and_keeps_the_chat(tmp_path):
    """Case 8: Ctrl-C during a --chat reply was a traceback and the history lost; now the reply stops, that
    turn is dropped, and the chat answers the next line."""
    from tests.helpers.fault_hooks import env_with

    adapter = tiny_chat_adapter(tmp_path)
    started, log_path = tmp_path / "started", tmp_path / "chat.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "generate.py"), "--adapter", str(adapter),
                                 "--chat", "--max_new_tokens", "2", "--device", "cpu"], stdin=subprocess.PIPE,
                                env=env_with(ADAMOLE_TEST_SLOW_FORWARD="1", ADAMOLE_TEST_STARTED=str(started)),
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=sigint_as_on_a_terminal)
        try:
            proc.stdin.write("hi there\n")
            proc.stdin.flush()
            wait_for(proc, log_path, started.exists, "the first reply")
            proc.send_signal(signal.SIGINT)
            wait_for_text(proc, log_path, "reply stopped")
            proc.stdin.write("what now\n/exit\n")
            proc.stdin.close()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 0 and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "(reply stopped; that turn is not kept in the history)" in text
    assert text.count("assistant> ") == 2  # the stopped reply, then the answer to the next line
