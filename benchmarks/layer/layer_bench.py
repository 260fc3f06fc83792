"""Forward+backward time of one adapted linear layer's adapter, per method, on the same inputs.

    python benchmarks/layer/layer_bench.py                      # d=2048, N=8, r=4, 4096 tokens, 2 threads
    python benchmarks/layer/layer_bench.py --json out.json      # also write the records
    python benchmarks/layer/layer_bench.py --sweep-paths        # dense vs grouped crossover (backs experts.py's rule)
    python benchmarks/layer/layer_bench.py --compile            # also lora and adamole under torch.compile

Times the adapter's contribution (routing, experts, combine, aux loss; the frozen base matmul
is reported once as ``base_linear`` for scale). ``lora`` has rank N*r. ``loop_reference`` is a
per-expert Python loop shaped like the public AdaMoLE code. Methods run round-robin so machine
noise hits all of them alike; medians are quoted.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.moe.experts import GROUPED_PAIR_COST, choose_compute_path
from adamole_dist.moe.routing_stats import summarize_stats
from adamole_dist.parallel.device_timer import timed
from adamole_dist.train.compile import random_numbers_for
from benchmarks.common.operators import ComputingOperators
from benchmarks.common.records import write_records
from benchmarks.layer.loop_reference import LoopAdaMoLE

MOE_METHODS = ["mole_topk", "mole_threshold", "sira", "adamole"]


class Case:
    """One timed variant: a callable returning (delta, aux loss: an adapted layer's, a zero without one; None for
    the loop reference and the base layer), plus its parameters."""

    def __init__(self, method: str, module: nn.Module, run, avg_active) -> None:
        self.method, self.module, self.run, self.avg_active = method, module, run, avg_active
        self.times_ms: list[float] = []


def adapted_case(method: str, args, d: int, path: str = "auto", top_k: int = 2, label: str | None = None,
                 compiled: bool = False) -> Case:
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    n, r = (1, args.num_experts * args.rank) if method == "lora" else (args.num_experts, args.rank)
    cfg = AdapterConfig(method=method, num_experts=n, rank=r, dropout=args.dropout, top_k=top_k, compute_path=path)
    layer = adapt_linear(base, cfg)
    layer.train()
    if layer.router is not None:  # B starts at zero; give it values so the path is realistic
        nn.init.normal_(layer.experts.lora_B, std=0.01)
    else:
        nn.init.normal_(layer.lora.lora_B, std=0.01)

    if compiled:
        random_numbers_for(torch.device("cpu"))  # the benchmark runs on the CPU
    delta_of = torch.compile(layer.delta) if compiled else layer.delta  # the trainer's --compile, one layer

    def run(x):
        delta = delta_of(x)
        return delta, layer.context.take_aux_loss()

    def avg_active():
        if layer.router is None:
            return 1.0
        stats = layer.context.stats.get(layer.adapter_name)
        return summarize_stats(stats, False)["mean_active_experts"] if stats is not None else float("nan")

    params = [p for p in layer.parameters() if p.requires_grad]
    if layer.router is not None:
        params += list(layer.experts.parameters())
    case = Case(label or method, layer, run, avg_active)
    case.params = params
    if not compiled:
        case.operators = count_operators(case, d)
    return case


def count_operators(case: Case, d: int, tokens: int = 256) -> int:
    """The computing operators (views excluded) of the case's forward and backward with its aux loss, on
    ``tokens`` tokens, counted on the second call (the first creates buffers): one kernel launch each on a GPU."""
    x = torch.randn(tokens, d)
    for _ in range(2):
        with ComputingOperators() as ops:
            delta, aux = case.run(x.detach().requires_grad_(True))
            (delta.sum() + (aux if aux is not None else 0)).backward()
    for p in case.params:
        p.grad = None
    return ops.total


def loop_case(args, d: int) -> Case:
    torch.manual_seed(0)
    mod = LoopAdaMoLE(d, d, args.num_experts, args.rank, 16.0, args.dropout).train()
    for e in mod.experts:
        nn.init.normal_(e.lora_B.weight, std=0.01)
    state = {"active": 0.0, "tokens": 0}

    def run(x):
        with torch.no_grad():
            xf = x.reshape(-1, d)
            probs = torch.softmax(mod.router(xf), -1)
            tau = torch.sigmoid(mod.threshold_fn(xf)) * mod.max_threshold
            state["active"] += (probs - tau >= 0).sum().item()
            state["tokens"] += xf.shape[0]
        return mod(x), None

    case = Case("loop_reference", mod, run, lambda: state["active"] / max(state["tokens"], 1))
    case.params = list(mod.parameters())
    return case


def base_case(args, d: int) -> Case:
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    case = Case("base_linear", base, lambda x: (base(x), None), lambda: 0.0)
    case.params = []
    return case


def time_cases(cases: list[Case], x: torch.Tensor, grad: torch.Tensor, repeats: int, warmup: int) -> None:
    for it in range(warmup + repeats):
        for case in cases:  # round-robin: noise spreads evenly over the methods
            xx = x.detach().requires_grad_(True)
            for p in case.params:
                p.grad = None
            with timed(x.device) as elapsed:  # the device synchronised: kernels, not launches, on a GPU
                delta, aux = case.run(xx)
                loss = (delta * grad).sum()
                if aux is not None:
                    loss = loss + 1e-3 * aux
                loss.backward()
            dt = elapsed.seconds * 1000
            if it >= warmup:
                case.times_ms.append(dt)


def record(case: Case, args, d: int, rank: int, num_experts: int) -> dict:
    return {
        "method": case.method,
        "d": d,
        "num_experts": num_experts,
        "rank": rank,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "avg_active_experts": round(case.avg_active(), 3),
        "ms_median": round(statistics.median(case.times_ms), 3),
        "ms_min": round(min(case.times_ms), 3),
        "ms_max": round(max(case.times_ms), 3),
        "operators_fwd_bwd": getattr(case, "operators", None),
    }


def main_methods(args) -> list[dict]:
    d = args.d
    cases = [adapted_case("lora", args, d)] + [adapted_case(m, args, d) for m in MOE_METHODS]
    if args.compile:
        cases += [adapted_case(m, args, d, label=f"{m}+compile", compiled=True) for m in ("lora", "adamole")]
    cases += [loop_case(args, d), base_case(args, d)]
    x = torch.randn(args.tokens, d)
    grad = torch.randn(args.tokens, d)
    time_cases(cases, x, grad, args.repeats, args.warmup)
    recs = []
    for c in cases:
        n, r = (1, args.num_experts * args.rank) if c.method.startswith("lora") else (args.num_experts, args.rank)
        if c.method == "base_linear":
            n, r = 0, 0
        recs.append(record(c, args, d, r, n))
    lora = next(r["ms_median"] for r in recs if r["method"] == "lora")
    loop = next(r["ms_median"] for r in recs if r["method"] == "loop_reference")
    print(f"{'method':<16}{'N':>4}{'r':>5}{'active':>8}{'median ms':>11}{'min':>9}{'max':>9}{'x lora':>8}{'ops':>6}")
    for r in recs:
        ops = r["operators_fwd_bwd"] if r["operators_fwd_bwd"] is not None else "-"
        print(f"{r['method']:<16}{r['num_experts']:>4}{r['rank']:>5}{r['avg_active_experts']:>8.2f}"
              f"{r['ms_median']:>11.1f}{r['ms_min']:>9.1f}{r['ms_max']:>9.1f}{r['ms_median'] / lora:>8.2f}{ops:>6}")
    ada = next(r["ms_median"] for r in recs if r["method"] == "adamole")
    print(f"\nadamole / lora = {ada / lora:.2f} (target <= 1.08); "
          f"loop_reference / adamole = {loop / ada:.1f} (target >= 5)")
    if args.compile:
        ada_c = next(r["ms_median"] for r in recs if r["method"] == "adamole+compile")
        lora_c = next(r["ms_median"] for r in recs if r["method"] == "lora+compile")
        print(f"adamole+compile / lora = {ada_c / lora:.2f} (target <= 1.0); "
              f"adamole+compile / lora+compile = {ada_c / lora_c:.2f}")
    return recs


def sweep_paths(args) -> list[dict]:
    """Dense vs grouped for mole_topk over experts, rank and k (active fraction k/N)."""
    recs = []
    d = args.d
    x = torch.randn(args.tokens, d)
    grad = torch.randn(args.tokens, d)
    print(f"{'N':>4}{'r':>5}{'N*r':>6}{'k':>4}{'active%':>9}{'dense ms':>10}{'grouped ms':>12}{'grouped/dense':>15}"
          f"{'rule picks':>12}{'faster':>9}")
    agree = 0
    for n, r in [(8, 4), (8, 16), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)]:
        for k in sorted({1, 2, max(1, n // 4), max(1, n // 2)}):
            a = argparse.Namespace(**{**vars(args), "num_experts": n, "rank": r})
            dense = adapted_case("mole_topk", a, d, path="dense", top_k=k, label="dense")
            grouped = adapted_case("mole_topk", a, d, path="grouped", top_k=k, label="grouped")
            time_cases([dense, grouped], x, grad, args.sweep_repeats, 1)
            md, mg = statistics.median(dense.times_ms), statistics.median(grouped.times_ms)
            picked = choose_compute_path(n, r, float(k))
            faster = "grouped" if mg < md else "dense"
            agree += picked == faster or abs(mg / md - 1) < 0.1  # within 10%: either is right
            print(f"{n:>4}{r:>5}{n * r:>6}{k:>4}{100 * k / n:>8.1f}%{md:>10.1f}{mg:>12.1f}{mg / md:>15.2f}"
                  f"{picked:>12}{faster:>9}")
            for c, m in [(dense, "dense"), (grouped, "grouped")]:
                rec = record(c, args, d, r, n)
                rec.update(method=f"mole_topk_{m}", top_k=k, active_fraction=k / n, rule_picks=picked)
                recs.append(rec)
    print(f"\nrule (grouped iff avg_active * {GROUPED_PAIR_COST} < N*r) picks the faster path, or one within 10%, "
          f"in {agree}/{len(recs) // 2} cases")
    return recs


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048, help="input = output features of the layer")
    ap.add_argument("--num_experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4, help="rank per expert (lora gets num_experts * rank)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also lora and adamole with torch.compile (the "
                    "compilation falls in the --warmup rounds)")
    ap.add_argument("--sweep-paths", action="store_true", help="time dense vs grouped over N, r, k instead")
    ap.add_argument("--sweep-repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the records to this JSON file")
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """Every method on the same inputs (its table printed), or with --sweep-paths the path sweep."""
    torch.set_num_threads(args.threads)
    return sweep_paths(args) if args.sweep_paths else main_methods(args)


def report(recs: list[dict], args) -> None:
    if args.json:
        write_records(args.json, recs, announce=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
