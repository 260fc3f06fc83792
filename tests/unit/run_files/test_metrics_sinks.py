"""Text records reach the sinks a person reads: greedy samples become a wandb table (offline run)."""

import json

from adamole_dist.run_files.metrics_log import MetricsLogger, read_metrics


def test_samples_are_a_wandb_table_and_a_jsonl_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, "wandb", enabled=True, run_config={}, project="t")
    samples = [{"prompt": "Name a colour.", "completion": "Red.", "reference": "Blue."}]
    logger.log(5, "samples", {"samples": samples})
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["samples"] == samples
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "completion", "reference"]
    assert table["data"] == [["Name a colour.", "Red.", "Blue."]]
