"""End-to-end: our adamole vs our lora vs Hugging Face PEFT LoRA — same model, data, steps, ranks.

    python benchmarks/scaling/e2e_compare.py --worlds 1,2 --json benchmarks/results/e2e.json
    python benchmarks/scaling/e2e_compare.py --model smollm2-135m --worlds 1 --batch 4 --max_length 128 --threads 2 \
        --repeats 5 --json benchmarks/results/e2e_decoder.json      # the decoder case (SmolLM2-135M)

MiniLM-L6 under DeepSpeed ZeRO-3, the same training loop (benchmarks/scaling/step_worker.py) for all
three; PEFT LoRA has our lora's rank (N*r = 32), alpha, dropout and targets. Each system runs in
its own processes (peak RSS is per process). Methods run round-robin --repeats times and the
median tokens/s is kept, so machine noise hits all alike. Writes records
{system, method, world, ep_size, tokens_per_s, peak_rss_mb, ...}, with the shapes the memory planner needs
(rows per example: an encoder scores each choice as a row; the longest row a batch was padded to).
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

from benchmarks.common.records import write_records

# (system, method, compiled): the compiled variants run with --compile (train/compile.py: every block)
SYSTEMS = [("adamole_dist", "adamole", False), ("adamole_dist", "lora", False), ("peft", "lora", False)]
COMPILED = [("adamole_dist", "adamole", True), ("adamole_dist", "lora", True)]
WORKER = str(REPO / "benchmarks" / "scaling" / "step_worker.py")


def run_once(system: str, method: str, compiled: bool, world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads))
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port",
               str(29700 + world), WORKER, "--system", system, "--method", method,
               "--batch", str(args.batch), "--steps", str(args.steps), "--model", args.model,
               "--max_length", str(args.max_length), "--warmup", str(args.warmup), "--json", str(out)]
        cmd += ["--compile"] if compiled else []
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{system}/{method}{' compiled' if compiled else ''} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())[0]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--batch", type=int, default=16, help="examples per rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="minilm-l6", help="minilm-l6, or a decoder: smollm2-135m (q/k/v/o, r=32)")
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compilation falls in them)")
    ap.add_argument("--compile", action="store_true", help="also our adamole and lora with --compile")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """Every system at every world size, round-robin --repeats times; one record per (system, world)
    with the medians over the repeats."""
    records = []
    systems = SYSTEMS + (COMPILED if args.compile else [])
    for world in map(int, args.worlds.split(",")):
        runs: dict[tuple, list[dict]] = {}
        for _ in range(args.repeats):
            for system, method, compiled in systems:
                runs.setdefault((system, method, compiled), []).append(run_once(system, method, compiled, world, args))
        for (system, method, compiled), rs in runs.items():
            records.append({"system": system, "method": method, "compiled": compiled, "model": args.model,
                            "world": world, "ep_size": 1, "examples_per_rank": args.batch,
                            "rows_per_example": rs[0]["rows_per_example"],
                            "padded_length_max": max(r["padded_length_max"] for r in rs),
                            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                            "peak_rss_mb": statistics.median(r["peak_mem_mb_max"] for r in rs),
                            "step_ms_median": statistics.median(r["step_ms"] for r in rs),
                            "runs": len(rs)})
    return records


def report(records: list[dict], args) -> None:
    print(f"{'system':<14}{'method':<9}{'compiled':>9}{'world':>6}{'tokens/s':>10}{'peak RSS MB':>13}"
          f"{'vs our lora':>12}{'vs PEFT':>9}")
    for r in records:
        ours = next(x for x in records if x["world"] == r["world"] and x["system"] == "adamole_dist"
                    and x["method"] == "lora" and not x.get("compiled"))
        peft = next(x for x in records if x["world"] == r["world"] and x["system"] == "peft")
        print(f"{r['system']:<14}{r['method']:<9}{'yes' if r.get('compiled') else 'no':>9}{r['world']:>6}"
              f"{r['tokens_per_s']:>10.0f}{r['peak_rss_mb']:>13.0f}"
              f"{r['tokens_per_s'] / ours['tokens_per_s']:>12.2f}{r['tokens_per_s'] / peft['tokens_per_s']:>9.2f}")
    if args.json:
        write_records(args.json, records, announce=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
