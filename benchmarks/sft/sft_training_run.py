"""The SFT training run: a decoder (SmolLM2-135M-Instruct by default; Gemma 3 270M with
--recipe recipes/gemma3_sharegpt.yaml) fine-tuned on real ShareGPT conversations with adamole and with
lora r=32 for the same steps, held-out loss against the base model's (zero-shot).

    python benchmarks/sft/prepare_sharegpt.py --out /tmp/sharegpt --train 2300 --test 200 --max_chars 2000
    python benchmarks/sft/sft_training_run.py --data /tmp/sharegpt --runs runs/sft_bench \\
        --json benchmarks/results/sft_training_run.json --plot benchmarks/results/sft_training_run.png

Each method is one ``launch/train.py`` run of the recipe (--recipe; packed rows, loss on the
assistant turns, ZeRO-3 config) with the overrides below, in ``RUNS/<method>``; a run that finished is
read, not repeated, and an interrupted one continues (``--resume latest``), so the benchmark can be
spread over several sessions. The zero-shot loss is the evaluation before the first step
(``eval_at_start``): both adapters start as the identity (B = 0), so it is the base model's held-out
loss on the same examples, and the two runs must agree on it. Reported per method: the held-out loss
curve, the final loss and perplexity, its gain over zero-shot, the median real tokens/s of the
training log windows and the wall time; ``--skip_train`` only reads the runs that exist.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from adamole_dist.config.training import QUANTIZE_BASE  # noqa: E402  (the checkout's, run as a script)

METHODS = {  # method -> its adapter overrides (adamole's come from the recipe: 8 experts x r=4)
    "adamole": [],
    "lora": ["--method", "lora", "--rank", "32"],
}


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a truncated last line
            break
    return records


def finished(run_dir: Path, steps: int) -> bool:
    """The run reached ``steps`` and saved its adapter (the loop's last act)."""
    evals = [r for r in read_records(run_dir) if r["kind"] == "eval"]
    return bool(evals) and evals[-1]["step"] >= steps and (run_dir / "adapter").is_dir()


def train_command(args, method: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", str(REPO / "ds_configs" / "zero3.json"),
           "--config", str(args.recipe), "--dataset", str(args.data),
           "--data_format", "messages", "--max_length", str(args.max_length), "--max_steps", str(args.steps),
           "--micro_batch_size", str(args.micro_batch_size), "--gradient_accumulation_steps", str(args.grad_accum),
           "--lr", str(args.lr), "--eval_interval", str(args.eval_interval), "--eval_at_start",
           "--save_interval", str(args.eval_interval), "--max_eval_examples", str(args.eval_examples),
           "--sample_prompts", str(args.sample_prompts), "--seed", str(args.seed), "--output_dir", str(run_dir),
           "--quantize_base", args.quantize_base, *METHODS[method]]
    if (run_dir / "checkpoints").is_dir():
        cmd += ["--resume", "latest"]
    return cmd


def summarise(method: str, run_dir: Path) -> dict:
    records = read_records(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    if not evals or evals[0]["step"] != 0:
        raise SystemExit(f"{run_dir}: no evaluation at step 0 in metrics.jsonl (was the run started here?)")
    first, last = evals[0], evals[-1]
    return {
        "method": method, "run_dir": str(run_dir), "steps": last["step"],
        "zero_shot_loss": first["eval_loss"], "final_loss": last["eval_loss"],
        "final_perplexity": last["perplexity"], "gain_over_zero_shot": first["eval_loss"] - last["eval_loss"],
        "beats_base": last["eval_loss"] < first["eval_loss"], "eval_examples": last["total"],
        "eval_tokens": last["eval_tokens"],
        "curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in evals],
        "train_curve": [{"step": r["step"], "task_loss": r["task_loss"]} for r in train],
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
        "median_padding_fraction": statistics.median(r["padding_fraction"] for r in train) if train else None,
        "mean_active_experts": last.get("mean_active_experts"),
        "wall_s": round(records[-1]["time"] - records[0]["time"], 1),
    }


def plot(results: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, train) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        held.plot([p["step"] for p in r["curve"]], [p["eval_loss"] for p in r["curve"]], marker="o", label=r["method"])
        train.plot([p["step"] for p in r["train_curve"]], [p["task_loss"] for p in r["train_curve"]],
                   label=r["method"], alpha=0.8)
    held.axhline(results[0]["zero_shot_loss"], color="grey", linestyle="--", label="base model (zero-shot)")
    held.set(title="held-out loss per target token", xlabel="optimizer step", ylabel="loss")
    train.set(title="training loss (log windows)", xlabel="optimizer step", ylabel="loss")
    for ax in (held, train):
        ax.grid(alpha=0.3)
        ax.legend()
    names = {"adamole": "adamole 8 x r=4", "lora": "lora r=32"}  # the methods' adapters (METHODS)
    fig.suptitle(f"{model} on ShareGPT: " + " vs ".join(names.get(r["method"], r["method"]) for r in results))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recipe_model(recipe: Path) -> str:
    import yaml

    return str(yaml.safe_load(recipe.read_text(encoding="utf-8")).get("model", recipe.stem))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder of train.jsonl/test.jsonl (prepare_sharegpt.py)")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_sharegpt.yaml",
                    help="the training recipe (its model, adapter and data format; the flags below override)")
    ap.add_argument("--runs", type=Path, default=Path("runs/sft_bench"), help="the runs go to RUNS/<method>")
    ap.add_argument("--methods", default="adamole,lora", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps of every method")
    ap.add_argument("--eval_interval", type=int, default=40, help="held-out evaluation (and checkpoint) every N steps")
    ap.add_argument("--eval_examples", type=int, default=100, help="held-out conversations evaluated")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--micro_batch_size", type=int, default=2, help="packed rows per micro batch")
    ap.add_argument("--grad_accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sample_prompts", type=int, default=0, help="greedy samples at every evaluation (slow on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize_base", default="none", choices=QUANTIZE_BASE,
                    help="the frozen base quantized (QLoRA; compare nf4 with none in two --runs folders)")
    ap.add_argument("--skip_train", action="store_true", help="only read the runs already in RUNS")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """Train every method whose run is not finished (none with --skip_train); the summary of every
    method's run in RUNS."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    for method in methods:
        run_dir = args.runs / method
        if args.skip_train or finished(run_dir, args.steps):
            continue
        cmd = train_command(args, method, run_dir)
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=REPO)
        if code != 0:
            raise SystemExit(f"{method}: launch/train.py exited {code} after {time.perf_counter() - t0:.0f} s")
    results = [summarise(m, args.runs / m) for m in methods if read_records(args.runs / m)]
    if not results:
        raise SystemExit(f"no runs in {args.runs}")
    return results


def report(results: list[dict], args) -> None:
    """The table, whether the runs' zero-shot losses agree, --json and --plot."""
    zero = [r["zero_shot_loss"] for r in results]
    agree = max(zero) - min(zero) <= 1e-3 * max(zero)  # bf16 autocast: the same forward, the same examples
    print(f"\n{'method':<8} {'steps':>5} {'zero-shot':>9} {'final':>7} {'gain':>7} {'ppl':>7} {'tok/s':>6} {'wall':>7}")
    for r in results:
        print(f"{r['method']:<8} {r['steps']:>5} {r['zero_shot_loss']:>9.4f} {r['final_loss']:>7.4f} "
              f"{r['gain_over_zero_shot']:>7.4f} {r['final_perplexity']:>7.2f} "
              f"{r['median_tokens_per_s'] or math.nan:>6.0f}"
              f" {r['wall_s']:>6.0f}s")
    print(f"zero-shot losses agree across runs: {agree} ({', '.join(f'{z:.5f}' for z in zero)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "plot")}
        args.json.write_text(json.dumps({"benchmark": "sft_training_run", "config": config,
                                         "zero_shot_agree": agree, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, recipe_model(args.recipe))
        print(f"wrote {args.plot}")


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
