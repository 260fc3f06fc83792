"""Bad input stops launch/train.py before any work: exit code 2, a message naming the field,
and nothing written to the output directory."""

import json

import pytest
from launch_utils import python_cmd, run

BASE = ["--max_steps", "1", "--max_train_examples", "16", "--max_eval_examples", "8"]


def fails_cleanly(tmp_path, *args, expect: list[str], out_name="run"):
    out = tmp_path / out_name
    proc = run(python_cmd("--output_dir", str(out), *BASE, *args), timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert "error:" in message
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    return out, message


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--method", "moe_magic"], ["method", "moe_magic", "adamole"]),
        (["--tau_max", "1.5"], ["adapter.tau_max", "1.5", "(0, 1]"]),
        (["--tau_max", "0"], ["adapter.tau_max", "(0, 1]"]),
        (["--method", "mole_topk", "--top_k", "9"], ["adapter.top_k", "9", "adapter.num_experts (8)"]),
        (["--num_experts", "0"], ["adapter.num_experts", "0"]),
        (["--rank", "-2"], ["adapter.rank", "-2"]),
        (["--num_experts", "6", "--ep_size", "4"], ["adapter.num_experts (6)", "ep_size (4)"]),
        (["--ep_size", "2"], ["ep_size (2)", "world size (1)"]),
        (["--method", "lora", "--ep_size", "2"], ["ep_size (2)", "MoE method"]),
        (["--pooling", "max"], ["--pooling", "'max'", "'cls', 'mean'"]),
    ],
)
def test_bad_adapter_options(tmp_path, args, expect):
    out, _ = fails_cleanly(tmp_path, *args, expect=expect)
    assert not out.exists()


def test_unknown_target_modules_lists_candidates(tmp_path):
    out, message = fails_cleanly(tmp_path, "--target_modules", "q_proj,value", expect=["q_proj", "candidates"])
    assert "query" in message and "attention.output.dense" in message
    assert not out.exists()


def test_dataset_missing_field_names_file_and_field(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                           "Answer format: true/false", "input": "", "output": "the correct answer is true",
            "answer": "true"}
    records = [dict(good) for _ in range(6)]
    del records[3]["answer"]
    (data / "train.json").write_text(json.dumps(records))
    (data / "test.json").write_text(json.dumps([good] * 4))
    out, message = fails_cleanly(tmp_path, "--dataset", str(data), expect=["train.json", "record 3", "'answer'"])
    assert not out.exists()


def test_output_dir_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "something-else"}))
    (out / "metrics.jsonl").write_text("{}\n")
    _, message = fails_cleanly(tmp_path, expect=["output_dir", "already holds a run", "--overwrite", "--resume"])
    assert json.loads((out / "run_config.json").read_text()) == {"model": "something-else"}
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_output_dir_with_foreign_files_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_cleanly(tmp_path, expect=["output_dir", "not one of our runs"])
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("section", [{"fp16": {"enabled": True}},
                                     {"torch_autocast": {"enabled": True, "dtype": "float16"}}])
def test_fp16_is_refused_naming_bf16_and_an_existing_run_survives(tmp_path, section):
    """fp16's loss scaling never reaches the experts (they train outside the engine): refused before
    anything is touched, even with --overwrite over a previous run."""
    ds = tmp_path / "ds_fp16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, **section}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "previous"}))
    _, message = fails_cleanly(tmp_path, "--ds_config", str(ds), "--overwrite", expect=["fp16", "bf16"])
    assert str(ds) in message
    assert json.loads((out / "run_config.json").read_text()) == {"model": "previous"}
