"""Typed configuration: validation messages name the field and the value; CLI and YAML recipes;
DeepSpeed config filling; the output-directory guard."""

import json
from pathlib import Path

import pytest

from adamole_dist import AdapterConfig, ConfigError
from adamole_dist.config.cli import parse_train_config
from adamole_dist.config.deepspeed import build_ds_config
from adamole_dist.config.training import TrainConfig
from adamole_dist.run_files.output_dir import check_output_dir, prepare_output_dir


@pytest.mark.parametrize(
    "kw, field, value",
    [
        ({"method": "moe"}, "adapter.method", "'moe'"),
        ({"tau_max": 0.0}, "adapter.tau_max", "0.0"),
        ({"tau_max": -1.0}, "adapter.tau_max", "-1.0"),
        ({"tau_max": 1.5}, "adapter.tau_max", "1.5"),
        ({"method": "mole_topk", "top_k": 9}, "adapter.top_k", "9"),
        ({"method": "sira", "top_k": 9}, "adapter.top_k", "9"),
        ({"num_experts": 0}, "adapter.num_experts", "0"),
        ({"rank": 0}, "adapter.rank", "0"),
        ({"rank": -3}, "adapter.rank", "-3"),
        ({"capacity_factor": -0.5}, "adapter.capacity_factor", "-0.5"),
        ({"dropout": 1.0}, "adapter.dropout", "1.0"),
        ({"method": "mole_topk", "aux_loss_variant": "reference"}, "adapter.aux_loss_variant", "mole_topk"),
        ({"rank": "four"}, "adapter.rank", "'four'"),
    ],
)
def test_adapter_config_errors_name_field_and_value(kw, field, value):
    with pytest.raises(ConfigError) as e:
        AdapterConfig(**kw)
    assert field in str(e.value) and value in str(e.value)


def test_adapter_config_defaults_and_round_trip():
    assert AdapterConfig(tau_max=1.0).effective_tau_max == 1.0
    assert AdapterConfig().effective_tau_max == pytest.approx(1 / 8)
    assert AdapterConfig(method="lora", num_experts=8).num_experts == 1
    assert AdapterConfig(method="sira").effective_capacity_factor == 1.0
    assert AdapterConfig().effective_capacity_factor == 0.0
    cfg = AdapterConfig(method="mole_topk", top_k=3, target_modules=["q_proj"])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown fields: bogus"):
        AdapterConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "kw, field",
    [({"micro_batch_size": 0}, "micro_batch_size"), ({"lr": 0.0}, "lr"), ({"lr_scheduler": "step"}, "lr_scheduler"),
     ({"ds_config": "/nonexistent.json"}, "ds_config"), ({"resume": "/nope"}, "resume"), ({"ep_size": -1}, "ep_size")],
)
def test_train_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kw)


def test_cli_flags_map_to_both_configs():
    cfg = parse_train_config(["--method", "mole_topk", "--top_k", "3", "--lr", "1e-4", "--target_modules",
                              "q_proj,v_proj", "--overwrite", "--local_rank", "0", "--ep_size", "auto"])
    assert cfg.adapter.method == "mole_topk" and cfg.adapter.top_k == 3
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.lr == 1e-4 and cfg.overwrite is True and cfg.ep_size == 0
    with pytest.raises(ConfigError, match="adapter.tau_max"):
        parse_train_config(["--tau_max", "2"])


@pytest.mark.parametrize("recipe", sorted(Path(__file__).resolve().parents[3].joinpath("recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_validates(recipe):
    cfg = parse_train_config(["--config", str(recipe)])
    cfg.validate()


def test_autocast_and_gradient_checkpointing_flags():
    cfg = parse_train_config(["--autocast", "bf16", "--gradient_checkpointing"])
    assert cfg.autocast == "bf16" and cfg.gradient_checkpointing is True
    assert parse_train_config([]).autocast == "auto"  # bf16 where fast: base_model/bf16.py
    with pytest.raises(SystemExit):
        parse_train_config(["--autocast", "fp16"])


def test_yaml_recipe_with_flag_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\nmax_steps: 7\nnum_experts: 4\nadapter:\n  rank: 2\n  method: sira\n")
    cfg = parse_train_config(["--config", str(recipe), "--max_steps", "9"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML reads 1e-4 as text; coerced
    assert cfg.max_steps == 9 and cfg.adapter.num_experts == 4 and cfg.adapter.rank == 2
    assert cfg.adapter.method == "sira"
    recipe.write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_train_config(["--config", str(recipe)])


def test_ds_config_auto_values_and_conflicts(tmp_path):
    cfg = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, lr=3e-4)
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 16
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["zero_optimization"]["stage"] == 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as e:
        build_ds_config(TrainConfig(micro_batch_size=4, ds_config=str(path)), world_size=1)
    assert "train_micro_batch_size_per_gpu (8)" in str(e.value) and "--micro_batch_size (4)" in str(e.value)
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="scheduler"):
        build_ds_config(TrainConfig(ds_config=str(path)), world_size=1)


def test_shipped_ds_configs_fill(tmp_path):
    for name in ("zero3", "zero2", "zero3_offload"):
        ds = build_ds_config(TrainConfig(ds_config=f"ds_configs/{name}.json"), world_size=2)
        assert "auto" not in json.dumps(ds)


def test_output_dir_guard(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "run")).to_dict()
    out = tmp_path / "run"
    check_output_dir(out, config, overwrite=False, resume="")  # does not exist: fine
    out.mkdir()
    check_output_dir(out, config, overwrite=False, resume="")  # empty: fine
    (out / "x.txt").write_text("x")
    for overwrite in (False, True):  # --overwrite never deletes what is not one of our runs
        with pytest.raises(ConfigError, match="not one of our runs"):
            check_output_dir(out, config, overwrite=overwrite, resume="")
    (out / "run_config.json").write_text("{}")  # a run of ours, but with a foreign file: --overwrite refuses
    with pytest.raises(ConfigError, match="also holds x.txt, which this trainer did not write"):
        check_output_dir(out, config, overwrite=True, resume="")
    (out / "x.txt").unlink()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".run.lock").write_text("{}")  # a lock nobody holds is no foreign file
    check_output_dir(out, config, overwrite=True, resume="")
    prepare_output_dir(out, config, overwrite=True)
    assert not (out / "metrics.jsonl").exists() and json.loads((out / "run_config.json").read_text())["lr"] == 2e-3
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "run_config.json"]  # the old entries are gone
    with pytest.raises(ConfigError, match="already holds a run"):
        check_output_dir(out, config, overwrite=False, resume="")
    check_output_dir(out, config, overwrite=False, resume="latest")  # same options: may continue
    other = TrainConfig(output_dir=str(out), lr=5.0).to_dict()
    with pytest.raises(ConfigError, match="different options.*lr"):
        check_output_dir(out, other, overwrite=False, resume="latest")
    continued = TrainConfig(output_dir=str(out), max_steps=999, ep_size=1).to_dict()
    check_output_dir(out, continued, overwrite=False, resume="latest")  # bookkeeping options may change


@pytest.mark.parametrize("field, text, message", [
    ("lr", "abc", "lr ('abc') must be a number"),
    ("max_steps", "2.5", "max_steps ('2.5') must be an integer"),
    ("tau_max", "big", "tau_max ('big') must be a number or null"),
])
def test_flags_and_recipes_take_one_coercion_path(tmp_path, field, text, message):
    """argparse passes text; the dataclasses convert it: a flag and a recipe value fail alike."""
    with pytest.raises(ConfigError) as from_flag:
        parse_train_config([f"--{field}", text])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{field}: '{text}'\n")
    with pytest.raises(ConfigError) as from_recipe:
        parse_train_config(["--config", str(recipe)])
    assert message in str(from_flag.value) and message in str(from_recipe.value)


def test_flag_text_converts_to_the_declared_types():
    cfg = parse_train_config(["--tau_max", "none", "--capacity_factor", "0.5", "--ep_size", "auto",
                              "--target_modules", "q_proj, v_proj", "--lr", "1e-3", "--max_steps", "7"])
    assert cfg.adapter.tau_max is None and cfg.adapter.capacity_factor == 0.5 and cfg.ep_size == 0
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.lr == 1e-3 and cfg.max_steps == 7
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.lr, float)


def test_a_run_recorded_before_an_option_existed_still_resumes(tmp_path):
    """An option added later (lm_framing) is absent from an older run's record: it counts as its default."""
    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out)).to_dict()
    older = {k: v for k, v in config.items() if k != "lm_framing"}
    older["adapter"] = {k: v for k, v in config["adapter"].items() if k != "compute_path"}
    prepare_output_dir(out, older, overwrite=False)
    check_output_dir(out, config, overwrite=False, resume="latest")
    changed = TrainConfig(output_dir=str(out), lm_framing="question_answer").to_dict()
    with pytest.raises(ConfigError, match="different options.*lm_framing"):
        check_output_dir(out, changed, overwrite=False, resume="latest")


def test_a_recipe_giving_a_key_twice_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    for text, message in [("adapter:\n  rank: 4\n  rank: 8\n", "'rank' is given twice (lines 2 and 3)"),
                          ("method: lora\nadapter:\n  method: adamole\n", "'method' is given twice (at the top level")]:
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=r"r\.yaml") as e:
            parse_train_config(["--config", str(recipe)])
        assert message in str(e.value)
    recipe.write_text("lr: 0.001\n<<: {lr: 0.002, seed: 3}\n")  # a merge key's values may be overridden
    cfg = parse_train_config(["--config", str(recipe)])
    assert cfg.lr == 0.001 and cfg.seed == 3


# -- the output dir's lock (ops/run_lock.py) ------------------------------------------------------------
HOLDER = """
import sys, time
from adamole_dist.run_files.run_lock import RunLock
lock = RunLock.take(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


def test_a_live_run_holds_the_output_dir_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    from adamole_dist.cli.console import configure_logging
    from adamole_dist.run_files.run_lock import LOCK_FILE, RunLock

    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out)).to_dict()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[3])
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = f"pid {holder.pid} on host {socket.gethostname()}"
        for attempt in (lambda: check_output_dir(out, config, overwrite=False, resume=""),
                        lambda: RunLock.take(out)):
            with pytest.raises(ConfigError, match=f"is in use by the run of {owner}"):
                attempt()
        assert json.loads((out / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": holder.pid}
    finally:
        holder.communicate("", timeout=60)
    assert not (out / LOCK_FILE).exists()  # released at the end of its run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    check_output_dir(out, config, overwrite=False, resume="")  # a killed run's lock holds nothing
    configure_logging()  # the commands' console lines (a library caller configures its own logging)
    capsys.readouterr()
    lock = RunLock.take(out)
    assert f"took over the lock of pid {int(dead.stdout)}" in capsys.readouterr().out
    assert json.loads((out / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    check_output_dir(out, config, overwrite=False, resume="")  # our own lock: checked again under it
    lock.release()
    assert list(out.iterdir()) == []
