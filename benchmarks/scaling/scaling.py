"""Scaling: training throughput and step breakdown over world sizes, ep_size in {1, world}.

Local (one machine; launches benchmarks/scaling/step_worker.py with torchrun per configuration):

    python benchmarks/scaling/scaling.py --worlds 1,2 --json benchmarks/results/scaling.json

On a cluster (one allocation per node count, appending to one JSON/CSV; see benchmarks/README.md):

    for n in 1 2 4 8; do sbatch --nodes $n --ntasks-per-node 8 --gpus-per-node 8 launch/slurm/scaling.sbatch; done
    python benchmarks/scaling/scaling.py --report runs/scaling.json --plot scaling.png

Each configuration runs weak scaling (fixed examples per rank) and strong scaling (fixed global
batch). Efficiency compares tokens/s with world w against w times the world-1 (or fewest-nodes)
tokens/s of the same mode and method. Every record carries the cost model's step time
(``predicted_ms_step``: the same steps timed with the experts switched off, plus the modelled
expert part, calibrated in the job) beside the measured one (``step_ms``). Also checks ZeRO-3:
per-rank frozen-base bytes at world 2 vs world 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from benchmarks.common.records import write_records

WORKER = str(REPO / "benchmarks" / "scaling" / "step_worker.py")


def run_config(world: int, ep: int, mode: str, args, out: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_port",
           str(29400 + world * 10 + ep), WORKER, "--method", args.method, "--ep_size", str(ep), "--mode", mode,
           "--batch", str(args.batch if mode == "weak" else args.batch * max(map(int, args.worlds.split(",")))),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out), "--predict",
           "--dispatch_dtype", args.dispatch_dtype]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def efficiency(records: list[dict]) -> list[dict]:
    """Add scaling efficiency: tokens/s against (units of scale) x the smallest run's tokens/s.

    Two series: replicated experts (ep_size 1) and expert parallel (ep_size > 1), both measured
    against the same smallest run (a single unit has nothing to shard, so it runs ep_size 1)."""
    unit = "nodes" if len({x["nodes"] for x in records}) > 1 else "world"
    for r in records:
        same = [x for x in records if x["mode"] == r["mode"] and x["method"] == r["method"]
                and x["system"] == r["system"]]
        smallest = min(x[unit] for x in same)
        base = next(x for x in same if x[unit] == smallest and x["ep_size"] == 1) if any(
            x[unit] == smallest and x["ep_size"] == 1 for x in same) else min(same, key=lambda x: x[unit])
        r["efficiency"] = r["tokens_per_s"] / (r[unit] / base[unit] * base["tokens_per_s"])
    return records


def table(records: list[dict]) -> str:
    lines = [f"{'mode':<7}{'nodes':>6}{'world':>6}{'ep':>4}{'tok/step':>9}{'tok/s':>8}{'eff':>6}{'step ms':>9}"
             f"{'fwd':>7}{'bwd':>7}{'opt':>6}{'a2a':>7}{'zero':>6}{'peak MB':>9}{'pred ms':>9}{'err%':>6}"]
    for r in sorted(records, key=lambda r: (r["mode"], r["nodes"], r["world"], r["ep_size"])):
        lines.append(
            f"{r['mode']:<7}{r['nodes']:>6}{r['world']:>6}{r['ep_size']:>4}{r['tokens_per_step']:>9.0f}"
            f"{r['tokens_per_s']:>8.0f}{r.get('efficiency', float('nan')):>6.2f}{r['step_ms']:>9.0f}"
            f"{r['forward_ms']:>7.0f}{r['backward_ms']:>7.0f}{r['optimizer_ms']:>6.0f}{r['a2a_ms']:>7.0f}"
            f"{r['zero_comm_ms']:>6.0f}{r['peak_mem_mb_max']:>9.0f}{r.get('predicted_ms_step', float('nan')):>9.0f}"
            f"{100 * r.get('prediction_error', float('nan')):>6.1f}")
    return "\n".join(lines)


def validation(records: list[dict]) -> str:
    """Predicted vs measured: every record's step time, and the extra step time of expert
    parallelism over replication (what decides the placement)."""
    out = []
    with_pred = [r for r in records if "predicted_ms_step" in r]
    if with_pred:
        errors = [abs(r["prediction_error"]) for r in with_pred]
        out.append(f"cost model, step time: largest error {100 * max(errors):.1f} % over {len(with_pred)} records "
                   "(target <= 15 %)")
    for mode in sorted({r["mode"] for r in records}):
        for world in sorted({r["world"] for r in records if r["world"] > 1}):
            rep = [r for r in records if r["mode"] == mode and r["world"] == world and r["ep_size"] == 1]
            ep = [r for r in records if r["mode"] == mode and r["world"] == world and r["ep_size"] > 1]
            if rep and ep and "pred_ep_ms" in ep[-1]:
                measured = ep[-1]["step_ms"] - rep[-1]["step_ms"]
                predicted = ep[-1]["predicted_ms_step"] - rep[-1]["predicted_ms_step"]
                out.append(f"{mode} world {world}: EP minus replicated step time: predicted {predicted:.0f} ms, "
                           f"measured {measured:.0f} ms; all-to-all predicted {ep[-1]['pred_a2a_ms']:.0f} ms, "
                           f"measured {ep[-1]['a2a_ms']:.0f} ms; cost model picks "
                           + ('replicated' if ep[-1]['pred_ep_ms'] > ep[-1]['pred_replicated_ms']
                              else 'expert parallel')
                           + f", measurement says {'replicated' if measured > 0 else 'expert parallel'}")
    return "\n".join(out)


def zero3_memory(records: list[dict]) -> str:
    one = [r for r in records if r["world"] == 1]
    two = [r for r in records if r["world"] == 2]
    if not (one and two):
        return ""
    ratio = two[0]["frozen_bytes_local_max"] / one[0]["frozen_bytes_local_max"]
    return (f"ZeRO-3 frozen base per rank: world 1 {one[0]['frozen_bytes_local_max'] / 2**20:.1f} MB, world 2 "
            f"{two[0]['frozen_bytes_local_max'] / 2**20:.1f} MB (ratio {ratio:.3f}, target <= 0.55)")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "nodes" if len({r["nodes"] for r in records}) > 1 else "world"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({r["mode"] for r in records}):
        smallest = min(r[unit] for r in records)
        series = {
            "replicated": [r for r in records if r["mode"] == mode and r["ep_size"] == 1],
            # expert parallel starts from the same single-unit run (ep_size 1 there)
            "expert parallel": [r for r in records if r["mode"] == mode
                                and (r["ep_size"] > 1 or (r[unit] == smallest and r["ep_size"] == 1))],
        }
        for kind, rs in series.items():
            rs = sorted(rs, key=lambda r: r[unit])
            if len(rs) < 2:
                continue
            a.plot([r[unit] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=f"{mode}, {kind}")
            b.plot([r[unit] for r in rs], [r["efficiency"] for r in rs], marker="o", label=f"{mode}, {kind}")
    a.set_xlabel(unit)
    a.set_ylabel("tokens / s")
    a.set_title("throughput")
    b.set_xlabel(unit)
    b.set_ylabel("scaling efficiency")
    b.set_ylim(0, 1.2)
    b.set_title("efficiency")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--modes", default="weak,strong")
    ap.add_argument("--method", default="adamole")
    ap.add_argument("--batch", type=int, default=16, help="examples per rank (weak); strong uses batch x max world")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--dispatch_dtype", default="fp32", choices=("fp32", "bf16"), help="expert parallelism's wire")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "scaling.json")
    ap.add_argument("--report", type=Path, help="only print the tables (and --plot) of an existing JSON")
    ap.add_argument("--plot", type=Path)
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """Every configuration run into --json (unless --report), then the records with their
    efficiency, written back."""
    if not args.report:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.unlink(missing_ok=True)
        for mode in args.modes.split(","):
            for world in map(int, args.worlds.split(",")):
                for ep in sorted({1, world}):
                    print(f"running {mode} scaling, world {world}, ep_size {ep} ...", flush=True)
                    run_config(world, ep, mode, args, args.json)
    records = efficiency(json.loads((args.report or args.json).read_text()))
    write_records(args.report or args.json, records)
    return records


def report(records: list[dict], args) -> None:
    print(table(records))
    print(validation(records))
    print(zero3_memory(records))
    if args.plot:
        plot(records, args.plot)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
