"""Where expert parallelism beats replicated experts: the placement cost model on a GPU cluster it
has not seen, across expert count, rank per expert, tokens per rank, node count and an expert
memory budget.

    python benchmarks/placement/crossover.py                 # markdown tables (benchmarks/README.md has them)
    python benchmarks/placement/crossover.py --json crossover.json

The model is costmodel/placement.py's, with rates from published figures instead of a calibration
(stated in CLUSTER and gpu_compute below): H100 SXM nodes of 8 GPUs, NVLink 4 inside a node,
one 400 Gb/s InfiniBand NDR port per GPU across nodes. The workload is Llama-2-7B's adapted
projections (q, k, v, o of 32 blocks, 4096 x 4096) with bf16 activations on the wire.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adamole_dist.costmodel.placement import CommModel, ComputeModel, Workload, choose_ep_size, predict_replicated
from benchmarks.common.records import write_records

GPUS_PER_NODE = 8
# Published figures: NVLink 4 is 900 GB/s per H100, 450 GB/s each way; a ConnectX-7 NDR port is
# 400 Gb/s = 50 GB/s each way, one per GPU on a DGX H100. Latencies: a few microseconds per NCCL
# message inside a node, more across the fabric (assumed 8 and 15 us).
CLUSTER = CommModel(alpha_intra=8e-6, beta_intra=450e9, alpha_inter=15e-6, beta_inter=50e9,
                    ranks_per_node=GPUS_PER_NODE)
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor cores
EFFICIENCY = 0.5  # of either peak, for small, skinny kernels
LAYERS = [(4096, 4096)] * (32 * 4)  # Llama-2-7B: q, k, v, o of 32 blocks


def gpu_compute(columns: int) -> ComputeModel:
    """Roofline rates for a bank of ``columns`` rank columns: LoRA's skinny matmuls are bound by
    memory (x and the delta cross HBM three times in fwd+bwd, 12 bytes per value in bf16 / fp32
    accumulation, shared by all columns) until a bank is wide enough to be bound by flops."""
    per_unit = max(6 / BF16_FLOPS, 12 / (columns * HBM_BYTES_PER_S)) / EFFICIENCY
    return ComputeModel(dense_s_per_unit=per_unit, grouped_s_per_unit=12 / HBM_BYTES_PER_S / EFFICIENCY,
                        route_s_per_unit=per_unit, copy_s_per_byte=2 / HBM_BYTES_PER_S / EFFICIENCY,
                        optimizer_s_per_param=16 * 3 / HBM_BYTES_PER_S / EFFICIENCY,
                        dispatch_fixed_s=50e-6, overlap=1.0)


def decide(num_experts: int, rank: int, tokens: int, nodes: int, active: float, budget_gb: float | None) -> dict:
    world = nodes * GPUS_PER_NODE
    w = Workload(layers=LAYERS, num_experts=num_experts, rank=rank, tokens_per_rank=tokens, avg_active=active,
                 world_size=world, act_bytes=2, overlap=True)
    comp = gpu_compute(num_experts * rank)
    ep_size, preds, _ = choose_ep_size(w, CLUSTER, comp, budget_gb * 1e9 if budget_gb else None)
    rep = predict_replicated(w, CLUSTER, comp)
    best = next(p for p in preds if p.ep_size == ep_size)
    return {"num_experts": num_experts, "rank": rank, "tokens_per_rank": tokens, "nodes": nodes, "world": world,
            "avg_active": active, "budget_gb": budget_gb, "ep_size": ep_size,
            "replicated_ms": round(1000 * rep.total_s, 3), "chosen_ms": round(1000 * best.total_s, 3),
            "replicated_fits": budget_gb is None or 4 * w.expert_param_count * w.grad_bytes <= budget_gb * 1e9}


def cell(d: dict) -> str:
    if d["ep_size"] == 1:
        return "rep"
    speed = d["replicated_ms"] / d["chosen_ms"]
    return f"EP{d['ep_size']}" + (f" {speed:.1f}x" if d["replicated_fits"] else " (mem)")


def tables(records: list[dict]) -> str:
    out = []
    for active_label in sorted({r["avg_active_label"] for r in records}):
        for budget in sorted({r["budget_gb"] or 0 for r in records}):
            rs = [r for r in records if r["avg_active_label"] == active_label and (r["budget_gb"] or 0) == budget]
            cols = sorted({(r["tokens_per_rank"], r["nodes"]) for r in rs})
            out.append(f"\n**{active_label}, expert memory budget "
                       f"{'none' if not budget else f'{budget:g} GB per GPU'}** (rows: experts x rank; "
                       "columns: tokens per GPU / nodes of 8 GPUs; rep = replicated is fastest, EPj = expert "
                       "parallel over j GPUs and how much faster, (mem) = replicated experts do not fit)\n")
            out.append("| N x r | " + " | ".join(f"{t} / {n}" for t, n in cols) + " |")
            out.append("|---" * (len(cols) + 1) + "|")
            for n, r in sorted({(r["num_experts"], r["rank"]) for r in rs}):
                row = {(x["tokens_per_rank"], x["nodes"]): x for x in rs if x["num_experts"] == n and x["rank"] == r}
                out.append(f"| {n} x {r} | " + " | ".join(cell(row[c]) for c in cols) + " |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="8,64,256")
    ap.add_argument("--ranks", default="4,64")
    ap.add_argument("--tokens", default="512,8192")
    ap.add_argument("--nodes", default="1,8,64")
    ap.add_argument("--budgets_gb", default="0,20", help="expert memory per GPU (0 = none)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """The cost model's decision for every combination of the grid's values."""
    records = []
    for n in map(int, args.experts.split(",")):
        for label, active in (("top-2 routing", 2.0), ("AdaMoLE-like dense routing (N/2 active)", n / 2)):
            for r in map(int, args.ranks.split(",")):
                for t in map(int, args.tokens.split(",")):
                    for nodes in map(int, args.nodes.split(",")):
                        for b in map(float, args.budgets_gb.split(",")):
                            d = decide(n, r, t, nodes, active, b or None)
                            records.append({**d, "avg_active_label": label})
    return records


def report(records: list[dict], args) -> None:
    print(tables(records))
    if args.json:
        write_records(args.json, records, announce=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
