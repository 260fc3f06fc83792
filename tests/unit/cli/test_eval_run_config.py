"""The evaluation CLI reads the training run's options (run_config.json beside the adapter) through
TrainConfig: what an older run's record lacks takes TrainConfig's defaults (not defaults of its own),
keys this version does not know are ignored."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig

REPO = Path(__file__).resolve().parents[3]


def eval_module():
    """The module holding the evaluation CLI's code (adamole_dist/cli/eval.py, else launch/eval.py)."""
    try:
        module = importlib.import_module("adamole_dist.cli.eval")
        if hasattr(module, "recorded_run"):
            return module
    except ImportError:
        pass
    sys.path.insert(0, str(REPO / "launch"))
    try:
        return importlib.import_module("eval")
    finally:
        sys.path.pop(0)


def test_a_record_reads_back_with_train_config_defaults_and_ignores_unknown_keys(tmp_path):
    record = {"dataset": "builtin:word_categories", "lm_framing": "question_answer", "an_option_of_old": 3,
              "resume": str(tmp_path / "gone" / "step_0000010"), "overwrite": False,
              "ds_config": str(tmp_path / "not_here.json"), "chat_template": str(tmp_path / "nor_here.jinja"),
              "adapter": {"method": "adamole", "num_experts": 4, "retired_adapter_option": True}}
    cfg = TrainConfig.from_record(record)
    assert cfg.lm_framing == "question_answer" and cfg.adapter.num_experts == 4
    defaults = TrainConfig()
    assert (cfg.max_length, cfg.seed, cfg.loss_on) == (defaults.max_length, defaults.seed, defaults.loss_on)
    assert cfg.resume == "" and cfg.ds_config == "" and cfg.chat_template == ""
    full = TrainConfig(max_length=48, seed=7).to_dict()
    assert TrainConfig.from_record(full) == TrainConfig(max_length=48, seed=7)  # to_dict round-trips
    with pytest.raises(ConfigError, match=r"run_config.json: max_length \(0\) must be positive"):
        TrainConfig.from_record({"max_length": 0})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TrainConfig.from_record(["not", "a", "mapping"])


@pytest.mark.parametrize("recorded", [{}, {"max_length": 48, "seed": 7}])
def test_eval_takes_max_length_and_seed_from_the_record_else_train_config(tmp_path, monkeypatch, recorded):
    from tests.helpers.saved_adapters import write_adapter_dir
    from tests.helpers.tiny_models import write_tiny_llama

    base = write_tiny_llama(tmp_path / "llama")
    adapter = write_adapter_dir(tmp_path / "run" / "adapter", base, "lora", rank=2)
    # an older run's record: no max_length, no seed, an option this version does not have
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(
        {"dataset": "builtin:word_categories", "eval_split": "test", "dropped_long_ago": "x", **recorded}))
    cli = eval_module()
    seen = {}
    real_load, real_task = cli.load_examples, cli.build_task_for

    def load_examples(*a, **kw):
        seen["seed"] = kw["seed"]
        return real_load(*a, **kw)

    def build_task_for(cfg, *a, **kw):
        seen["max_length"] = cfg.max_length
        return real_task(cfg, *a, **kw)

    monkeypatch.setattr(cli, "load_examples", load_examples)
    monkeypatch.setattr(cli, "build_task_for", build_task_for)
    assert cli.main(["--adapter", str(adapter), "--max_examples", "4", "--batch_size", "4"]) == 0
    expected = {"max_length": recorded.get("max_length", TrainConfig().max_length),
                "seed": recorded.get("seed", TrainConfig().seed)}
    assert seen == expected
    assert expected == ({"max_length": 256, "seed": 42} if not recorded else recorded)
