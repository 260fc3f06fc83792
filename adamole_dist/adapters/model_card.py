"""Model cards: a README.md with the Hugging Face Hub's YAML front matter (base_model, library_name,
tags, datasets, metrics and a model-index holding the final values), for adapter and export folders."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CARD_NAME = "README.md"
METRIC_TYPES = {"accuracy": "accuracy", "acc_norm": "acc_norm", "eval_loss": "loss", "perplexity": "perplexity"}
# final_metrics.json key -> card metric; a run scores multiple choice (accuracy) or free-form text (loss)


def card_inputs(adapter_dir: str | Path) -> tuple[list[str], dict]:
    """(datasets, final metrics) of the run an adapter came from: ``run_config.json`` and
    ``final_metrics.json`` beside the adapter directory, when they exist."""
    run_dir = Path(adapter_dir).parent
    datasets, metrics = [], {}
    run_config = run_dir / "run_config.json"
    if run_config.is_file():
        dataset = json.loads(run_config.read_text()).get("dataset")
        datasets = [str(dataset)] if dataset else []
    final = run_dir / "final_metrics.json"
    if final.is_file():
        metrics = {k: v for k, v in json.loads(final.read_text()).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return datasets, metrics


def front_matter(*, base_model: str, method: str, library_name: str, datasets: list[str], metrics: dict) -> dict:
    meta = {
        "base_model": base_model,
        "library_name": library_name,
        "tags": ["adamole_dist", method, "lora" if method == "lora" else "mixture-of-lora-experts"],
    }
    if datasets:
        meta["datasets"] = list(datasets)
    scored = {METRIC_TYPES[k]: float(v) for k, v in metrics.items() if k in METRIC_TYPES}
    if scored:
        meta["metrics"] = sorted(scored)
        meta["model-index"] = [{
            "name": f"{Path(base_model).name}-{method}",
            "results": [{
                "task": ({"type": "multiple-choice", "name": "Multiple choice"} if "accuracy" in metrics
                         else {"type": "text-generation", "name": "Text generation"}),
                "dataset": {"name": datasets[0] if datasets else "evaluation split",
                            "type": datasets[0] if datasets else "local"},
                "metrics": [{"type": k, "value": v} for k, v in sorted(scored.items())],
            }],
        }]
    return meta


def write_model_card(folder: Path, *, base_model: str, method: str, adapter_cfg: dict, datasets: list[str],
                     metrics: dict, extra: str = "", library_name: str = "adamole_dist") -> None:
    """Write ``folder/README.md``. ``metrics``: the run's final metrics (numbers only are kept);
    ``library_name``: what reads the folder (adamole_dist, peft, transformers)."""
    meta = front_matter(base_model=base_model, method=method, library_name=library_name,
                        datasets=datasets, metrics=metrics)
    hyper = {k: adapter_cfg[k] for k in ("method", "num_experts", "rank", "alpha", "dropout", "tau_max", "top_k",
                                         "target_modules") if k in adapter_cfg}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {method} adapter for {base_model}", "",
             f"Fine-tuned with adamole_dist ({method}).", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Adapter", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in hyper.items()]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["", "## Final metrics" + (f" ({', '.join(datasets)})" if datasets else ""), "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in numbers.items()]
    Path(folder, CARD_NAME).write_text("\n".join(lines) + "\n")
