"""Peak memory and tokens/s of one SmolLM2-135M training step: the plain loss (the full [tokens x vocabulary]
logits) against the chunked loss (base_model/chunked_loss.py, the trainer's default).

    python benchmarks/memory/memory.py --json benchmarks/results/memory.json
    python benchmarks/memory/memory.py --batch 8 --max_length 512 --steps 3 --repeats 2 --threads 2
    python benchmarks/memory/memory.py --losses chunked --quantize none,nf4,int8 \
        --json benchmarks/results/memory_quantized.json

Adamole 8 experts x r=4 on q/k/v/o, batch x max_length random tokens, every token a target but the first
(the SFT task's loss), fp32, the trainer's step (train/step.py) through a one-process engine (AdamW over
the adapters). Each (variant, repeat) runs in its own process, variants round-robin so machine noise
hits both alike; a process loads the model, runs --warmup untimed steps and --steps timed ones.
Reported per variant, medians over the repeats: tokens/s (median step), the process's peak RSS over
the timed steps (the peak is reset after the warm-up, /proc/self/clear_refs, so loading does not count;
the warm-up has paged in the memory-mapped weights and allocated the AdamW moments) and that peak above
the RSS before the first timed step (the step's own memory: logits, activations, gradients), and the
bytes of the base's linear-layer weights as stored (--quantize: bitsandbytes codes and scales; the LM
head, never quantized, left out). Writes
records {loss, model, batch, max_length, chunk_tokens, repeats, steps, tokens_per_s, peak_rss_mb,
step_peak_mb}. Step peak is the ratio the issue's target is stated for (chunked <= 0.7 x plain).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common.records import write_records  # noqa: E402

VARIANTS = ("plain", "chunked")
QUANTIZE = ("none", "nf4", "fp4", "int8")
WORKER = str(REPO / "benchmarks" / "memory" / "memory_worker.py")


def run_once(loss: str, quantize: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(REPO))
        cmd = [sys.executable, WORKER, "--loss", loss, "--batch", str(args.batch), "--max_length",
               str(args.max_length), "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", args.model,
               "--chunk", str(args.chunk), "--threads", str(args.threads), "--quantize_base", quantize,
               "--json", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{loss} loss, base {quantize} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--max_length", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant (round-robin)")
    ap.add_argument("--chunk", type=int, default=1024, help="the chunked loss's --loss_chunk_tokens")
    ap.add_argument("--losses", default="plain,chunked", help="loss variants: plain, chunked")
    ap.add_argument("--quantize", default="none", help="base variants: none, nf4, fp4, int8 (--quantize_base)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    args = ap.parse_args(argv)
    for name in ("batch", "max_length", "steps", "warmup", "repeats", "chunk", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} ({getattr(args, name)}) must be positive")
    args.losses, args.quantize = args.losses.split(","), args.quantize.split(",")
    if not set(args.losses) <= set(VARIANTS) or not set(args.quantize) <= set(QUANTIZE):
        ap.error(f"--losses takes {', '.join(VARIANTS)}; --quantize takes {', '.join(QUANTIZE)}")
    return args


def summarise(runs: list[dict], args) -> dict:
    first = runs[0]
    return {"loss": first["loss"], "quantize_base": first["quantize_base"],
            "base_linear_weights_mb": first["base_linear_weights_mb"], "model": args.model, "batch": args.batch,
            "max_length": args.max_length,
            "chunk_tokens": first["chunk_tokens"], "repeats": len(runs), "steps": args.steps,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "step_peak_mb": statistics.median(r["step_peak_mb"] for r in runs)}


def print_table(records: list[dict]) -> None:
    """Ratios against the plain loss on the unquantized base (the first record when there is none)."""
    base = next((r for r in records if r["loss"] == "plain" and r["quantize_base"] == "none"), records[0])
    print(f"{'loss':<9}{'base':<6}{'tokens/s':>10}{'peak RSS MB':>13}{'step peak MB':>14}{'base linear MB':>16}"
          f"{'x peak':>8}{'x step peak':>13}{'x tok/s':>9}")
    for r in records:
        print(f"{r['loss']:<9}{r['quantize_base']:<6}{r['tokens_per_s']:>10.1f}{r['peak_rss_mb']:>13.0f}"
              f"{r['step_peak_mb']:>14.0f}{r['base_linear_weights_mb']:>16.1f}"
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>8.2f}{r['step_peak_mb'] / base['step_peak_mb']:>13.2f}"
              f"{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    variants = [(loss, q) for q in args.quantize for loss in args.losses]
    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            runs[variant].append(run_once(*variant, args))
    records = [summarise(runs[v], args) for v in variants]
    print_table(records)
    if args.json is not None:
        write_records(args.json, records, announce=True)


if __name__ == "__main__":
    main()
