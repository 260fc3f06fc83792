"""Several adapters on one base (serving/models.py): the base's tensors are in memory once (every adapter's
copy holds the very same parameter and buffer objects), each adapter computes what it computes loaded on its
own, the base alone stays unadapted; adapters of another base, and classification adapters, are refused at
start, by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import adamole_dist
from adamole_dist.config.fields import ConfigError
from adamole_dist.moe.routing_stats import STAT_TOKENS
from adamole_dist.serving.models import load_served_models
from tests.helpers.saved_adapters import write_adapter_dir
from tests.helpers.serving import write_serving_models
from tests.helpers.tiny_models import write_tiny_llama

IDS = torch.tensor([[101, 1996, 4937, 2938, 2006]])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_serving_models(tmp_path_factory.mktemp("served"), max_positions=128)


@pytest.fixture(scope="module")
def served(dirs):
    adapters = {name: dirs[name] for name in ("adamole", "lora", "mole_topk")}
    return load_served_models(None, adapters, "base", device="cpu")


def test_adapters_share_the_base_tensors_and_compute_as_loaded_alone(served, dirs):
    base = served["base"].model
    base_tensors = {name: t for name, t in [*base.named_parameters(), *base.named_buffers()]}
    assert not any(type(m).__name__ == "AdaptedLinear" for m in base.modules())
    for name in ("adamole", "lora", "mole_topk"):
        net = served[name].model
        shared = [t for t in [*net.parameters(), *net.buffers()] if any(t is b for b in base_tensors.values())]
        assert len(shared) == len(base_tensors)  # every base tensor, the same object, not a copy
        alone, _ = adamole_dist.from_pretrained(dirs[name])
        with torch.no_grad():
            torch.testing.assert_close(net(input_ids=IDS).logits, alone(input_ids=IDS).logits)
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        assert not torch.allclose(plain, served["adamole"].model(input_ids=IDS).logits)
    context = served["adamole"].adapters.context
    # A server collects no routing statistics (nobody reads them)...
    assert all(float(s[STAT_TOKENS]) == 0 for s in context.pop_stats().values())
    context.collect_stats = True
    with torch.no_grad():
        with_stats = served["adamole"].model(input_ids=IDS).logits
    context.collect_stats = False
    counted = context.pop_stats()
    assert counted and all(float(s[STAT_TOKENS]) > 0 for s in counted.values())
    assert torch.equal(with_stats, served["adamole"].model(input_ids=IDS).logits)  # ...and the same logits
    assert served["adamole"].prompt_format == "chat" and served["lora"].prompt_format == "text"
    assert served["adamole"].has_experts and not served["lora"].has_experts and not served["base"].has_experts


def test_an_adapter_of_another_base_is_refused_by_name(dirs, tmp_path):
    other = write_tiny_llama(tmp_path / "other_base", seed=5)
    foreign = write_adapter_dir(tmp_path / "foreign", other, "adamole")
    with pytest.raises(ConfigError) as e:
        load_served_models(None, {"good": dirs["adamole"], "stranger": foreign}, "base", device="cpu")
    assert f"stranger={foreign}" in str(e.value) and str(other) in str(e.value) and "good=" not in str(e.value)


def test_a_classification_adapter_and_a_missing_directory_are_refused(dirs, tmp_path):
    cls_dir = tmp_path / "cls"
    shutil.copytree(dirs["lora"], cls_dir)
    doc = json.loads((cls_dir / "adapter_config.json").read_text())
    (cls_dir / "adapter_config.json").write_text(json.dumps({**doc, "task_type": "seq_cls"}))
    with pytest.raises(ConfigError, match=r"--adapter judge=.* is a seq_cls adapter"):
        load_served_models(None, {"judge": cls_dir}, "base", device="cpu")
    with pytest.raises(ConfigError, match=r"--adapter gone=.*does not exist"):
        load_served_models(None, {"gone": tmp_path / "nowhere"}, "base", device="cpu")
