"""The default job, as a new user meets it: ``deepspeed launch/train.py --ds_config ds_configs/zero3.json`` with
no option but a shorter run (SmolLM2-135M-Instruct, AdaMoLE, the generated chat task, packing, autocast auto),
then ``make chat``'s command on the adapter it wrote. The full-length run's numbers (training time, accuracy
before -> after) are measured by hand and quoted in docs/getting-started.md: a test never times."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers.launch_utils import BIN, REPO, TRAIN, check, free_port, launch_env, records, run

pytestmark = pytest.mark.slow


def make_recipe(target: str) -> str:
    """The shell line of a Makefile target (one line, the project's Makefile)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    return lines[lines.index(f"{target}: setup") + 1].strip()


def test_default_job_trains_the_chat_task_and_make_chat_answers_with_routing(tmp_path):
    out = tmp_path / "runs" / "default"
    proc = check(run([str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()), TRAIN,
                      "--ds_config", "ds_configs/zero3.json", "--output_dir", str(out),
                      "--max_steps", "4", "--max_eval_examples", "6"], timeout=1200))
    config = json.loads((out / "run_config.json").read_text())
    assert (config["model"], config["dataset"], config["packing"]) == ("smollm2-135m", "builtin:word_categories_chat",
                                                                      True)
    assert config["adapter"]["method"] == "adamole"
    data = records(out, "data")[0]
    assert data["data_format"] == "messages" and 0 < data["packed_rows"] < data["train_examples"]
    first, last = records(out, "eval")
    assert first["step"] == 0 and first["answered"] == last["answered"] == 6
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["zero_shot_accuracy"] == first["accuracy"] and final["accuracy"] == last["accuracy"]
    assert final["train_seconds"] > 0
    log = proc.stdout
    assert "held-out questions, base -> adapted (3 of 6):" in log
    assert re.search(r"held-out accuracy \(exact match of the generated answer\): \d\.\d{3} -> \d\.\d{3} \(\d/6\)",
                     log)
    assert re.search(rf"training took \d+m\d\ds \(4 steps\); adapter: {re.escape(str(out / 'adapter'))}", log)
    assert "Q: Which of these words is" in log
    assert re.search(r"autocast (bf16|none) \(auto: base_model/bf16\.py\)", log)

    # make chat: the Makefile's own line, on this run (RUN), with a typed question
    line = make_recipe("chat")
    assert line == "$(PY) launch/generate.py --adapter $(RUN)/adapter --chat --show_routing $(ARGS)"
    command = [sys.executable, "launch/generate.py", "--adapter", str(out / "adapter"), "--chat", "--show_routing",
               "--max_new_tokens", "4"]
    chat = subprocess.run(command, input="Which of these words is a color? dog, red, car, chair.\n/exit\n",
                          env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    reply = chat.stdout.split("assistant> ", 1)[1]
    strips = re.findall(r"mean\s+\d+\.\d\d  ([0-9a-z]+)$", reply, flags=re.M)
    # a character per adapted layer: q/k/v/o in SmolLM2's 30 blocks; AdaMoLE fires 1 to 8 experts in each
    assert strips and all(len(s) == 120 and set(s) <= set("12345678") for s in strips), reply
