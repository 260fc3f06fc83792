"""adamole-plan and train --plan: the plan printed, bad input one line and exit 2, nothing written."""

from __future__ import annotations

import json

from adamole_dist.cli import plan as plan_cli
from adamole_dist.cli import train as train_cli


def test_plan_prints_every_component_and_the_cards(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--model", "llama-3.1-70b", "--world_size", "8", "--micro_batch_size", "1",
                          "--max_length", "4096", "--gradient_checkpointing", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for words in ("frozen base shard", "experts + AdamW", "activations", "logits and loss", "temporary", "80 GB card"):
        assert words in text
    record = json.loads(out.read_text())
    assert [c["card_gb"] for c in record["cards"]] == [24, 40, 80, 141]
    fits = {c["card_gb"]: c for c in record["cards"]}
    assert fits[141]["largest_micro_batch"] >= fits[24]["largest_micro_batch"]


def test_plan_bad_input_is_one_line_and_exit_2(capsys):
    assert plan_cli.main(["--model", "llama-3.1-8b", "--world_size", "4", "--ep_size", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ep_size (3)" in err
    assert plan_cli.main(["--model", "/no/such/config.json"]) == 2
    assert "model (/no/such/config.json)" in capsys.readouterr().err


def test_train_plan_exits_0_and_writes_nothing(tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert train_cli.main(["--plan", "--model", "smollm2-135m", "--output_dir", str(output_dir)]) == 0
    assert "memory plan (prediction) for smollm2-135m" in capsys.readouterr().out
    assert not output_dir.exists()


def test_a_cpu_plan_names_no_card(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan_cli.main(["--model", "smollm2-135m", "--device", "cpu", "--precision", "fp32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "process baseline" in text and "GB card" not in text and "adamole-plan --device cuda" in text
    assert json.loads(out.read_text())["cards"] == []


def test_json_output_is_checked_before_any_work(tmp_path, capsys):
    """--json naming the model's own config.json is refused, the file left as it was (exit 2, one line)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    before = config.read_bytes()
    assert plan_cli.main(["--model", str(config), "--json", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json" in err and "--model file" in err
    assert config.read_bytes() == before
    assert plan_cli.main(["--model", str(config), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
