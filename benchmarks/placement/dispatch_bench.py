"""Expert-parallel dispatch of one adapted layer: bytes on the wire and where the time goes.

Launch on 2 CPU ranks (gloo):

    torchrun --nproc_per_node 2 benchmarks/placement/dispatch_bench.py --json dispatch.json

Per training step of one adapted linear with tokens_per_rank tokens on every rank (route,
experts, dispatch, backward, and the trainer's expert optimizer step: gradients all-reduced over
the ranks holding the same experts, clipped, AdamW) it reports the bytes the all-to-alls actually
sent to other ranks (summed over ranks, forward and backward), the minimum (each token once per
distinct remote rank owning one of its active experts, D values there and O back, in both
passes), and the time split route / permute / all-to-all / expert compute / combine (forward;
all-to-all also backward). ep_size 1 (experts replicated, no exchange) runs in the same process
for comparison. Medians over --steps.

Each record also carries the placement cost model's prediction of the step (``predicted_ms_step``
beside ``ms_step_median``, and its parts), calibrated in the same job right after the measurement
(costmodel/calibration.py) with the measured active experts per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.config.training import TrainConfig
from adamole_dist.costmodel.calibration import calibrate, calibrated_ep_size, calibration_record, parts_ms
from adamole_dist.costmodel.placement import Workload, predict_placement
from adamole_dist.parallel import collectives
from adamole_dist.parallel.device_timer import timed
from adamole_dist.parallel.ep_dispatcher import overlap_enabled, wire_bytes
from adamole_dist.parallel.layout import build_layout
from adamole_dist.runtime.host_memory import keep_freed_host_memory
from adamole_dist.train.builders import build_dispatcher, build_expert_optimizer
from adamole_dist.train.reporting import routing_over_ranks
from benchmarks.common.records import write_records

DEVICE = torch.device("cpu")  # gloo, CPU tensors


def expected_min_bytes(mask_TN: torch.Tensor, ep_size: int, me: int, in_features: int, out_features: int,
                       element_size: int) -> int:
    """Forward-pass minimum for this rank's tokens: each token once per distinct remote rank owning
    one of its kept experts, D values there and O values back."""
    T, N = mask_TN.shape
    dests_TJ = mask_TN.view(T, ep_size, N // ep_size).any(-1)
    remote = int(dests_TJ.sum().item()) - int(dests_TJ[:, me].sum().item())
    return remote * (in_features + out_features) * element_size


def all_sum(value: float) -> float:
    return collectives.sum_over_ranks([value])[0]


def adapted_layer(args, cfg: AdapterConfig, layout, dispatcher, rank: int):
    """The adapted linear (its experts this rank's slice, B non-zero) and this rank's own tokens and
    output gradient."""
    torch.manual_seed(0)
    base = nn.Linear(args.hidden, args.hidden, bias=False).requires_grad_(False)
    layer = adapt_linear(base, cfg, dispatcher=dispatcher, expert_slice=layout.expert_slice(args.num_experts))
    nn.init.normal_(layer.experts.lora_B, std=0.01)
    layer.train()
    torch.manual_seed(100 + rank)  # every rank its own tokens
    x = torch.randn(args.tokens_per_rank, args.hidden)
    grad = torch.randn(args.tokens_per_rank, args.hidden)
    return layer, x, grad


def time_steps(args, ep_size: int, layer, dispatcher, cfg: AdapterConfig, expert_opt, x, grad, layout) -> dict:
    """--warmup untimed steps, then --steps timed ones: per timed step the step and all-to-all
    seconds, the forward phases, the bytes sent to other ranks and their minimum (summed over ranks)."""
    counters = dispatcher.counters
    steps, a2a, phases, sent, minimum = [], [], {}, [], []
    for it in range(args.warmup + args.steps):
        xx = x.clone().requires_grad_(True)
        for p in list(layer.parameters()) + list(layer.experts.parameters()):
            p.grad = None
        if counters is not None:
            counters.reset()
        collectives.barrier()
        with timed(DEVICE) as step_time:
            with timed(DEVICE) as route_time:
                weights, kept = layer.route(xx, None)
            delta = dispatcher(xx, weights, kept, layer.experts, cfg.compute_path)
            delta.backward(grad)
            expert_opt.step()
        t_route, t_step = route_time.seconds, step_time.seconds
        layer.context.take_aux_loss()
        if it < args.warmup:
            layer.context.pop_stats()
            continue
        steps.append(t_step)
        phase = {"route": t_route, **(counters.timings if counters else {})}
        for k, v in phase.items():
            phases.setdefault(k, []).append(v)
        a2a.append(counters.a2a_seconds if counters else 0.0)
        sent.append(all_sum(counters.bytes_sent if counters else 0))
        # Independent of the counters: the minimum from the routing itself, forward and backward.
        fwd_min = expected_min_bytes(kept, ep_size, layout.ep_rank, args.hidden, args.hidden, x.element_size()) \
            if ep_size > 1 else 0
        minimum.append(all_sum(2 * fwd_min))
    return {"steps": steps, "a2a": a2a, "phases": phases, "sent": sent, "minimum": minimum}


def bench(args, ep_size: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = build_layout(ep_size, args.num_experts)
    dispatcher = build_dispatcher(layout, args.dispatch_dtype, args.overlap, DEVICE)
    cfg = adapter_config(args)
    layer, x, grad = adapted_layer(args, cfg, layout, dispatcher, rank)
    expert_opt = build_expert_optimizer(list(layer.experts.parameters()), world, TrainConfig(lr=1e-4), layout)
    t = time_steps(args, ep_size, layer, dispatcher, cfg, expert_opt, x, grad, layout)
    steps, a2a, phases, sent, minimum = t["steps"], t["a2a"], t["phases"], t["sent"], t["minimum"]
    overall = routing_over_ranks(layer.context.pop_stats(), has_tau=False)["layers"][layer.adapter_name]
    dropped, active = overall["dropped_fraction"], overall["mean_active_experts"]
    med = lambda v: 1000 * statistics.median(v)  # noqa: E731
    prediction = predict(args, cfg, ep_size, world, active, dispatcher)
    return {
        "ep_size": ep_size, "world": world, "tokens_per_rank": args.tokens_per_rank, "hidden": args.hidden,
        "num_experts": args.num_experts, "rank": args.rank, "method": args.method,
        "dispatch_dtype": args.dispatch_dtype if ep_size > 1 else None,
        "overlap": dispatcher.overlap if ep_size > 1 else None, "host_memory": args.host_memory,
        "avg_active_experts": round(active, 3),
        "bytes_sent": int(statistics.median(sent)), "bytes_min": int(statistics.median(minimum)),
        "ms_step_median": round(med(steps), 3), "ms_a2a_median": round(med(a2a), 3),
        "ms_phase_median": {k: round(med(v), 3) for k, v in phases.items()},
        "dropped_fraction": round(dropped, 5),
        **prediction,
        "prediction_error": round(prediction["predicted_ms_step"] / med(steps) - 1, 4),
    }


def auto_choice(args, world: int, active: float) -> tuple[int, str]:
    """What ``--ep_size auto`` picks here: the trainer's calibrated_ep_size, with the measured
    active experts per token (collective)."""
    w = workload(args, world, active, overlap=overlap_enabled(args.overlap, DEVICE))
    return calibrated_ep_size(w, "cpu", adapter=adapter_config(args))


def workload(args, world: int, active: float, overlap: bool) -> Workload:
    return Workload(layers=[(args.hidden, args.hidden)], num_experts=args.num_experts, rank=args.rank,
                    tokens_per_rank=args.tokens_per_rank, avg_active=active, world_size=world, act_bytes=4,
                    wire_bytes=wire_bytes(args.dispatch_dtype), overlap=overlap)


def adapter_config(args) -> AdapterConfig:
    return AdapterConfig(method=args.method, num_experts=args.num_experts, rank=args.rank, dropout=0.0,
                         capacity_factor=args.capacity_factor, top_k=args.top_k)


def predict(args, cfg, ep_size: int, world: int, active: float, dispatcher) -> dict:
    """The cost model's step time for this configuration, calibrated here and now (collective)."""
    w = workload(args, world, active, overlap=ep_size > 1 and dispatcher.overlap)
    comm, comp = calibrate(w, "cpu", adapter=cfg, ep_size=ep_size)
    p = predict_placement(w, ep_size, comm, comp)
    return {"predicted_ms_step": round(1000 * p.step_s, 3), "predicted_ms_parts": parts_ms(p.detail),
            "calibration": calibration_record(comm, comp)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens_per_rank", type=int, default=4096)
    ap.add_argument("--num_experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--method", default="adamole")
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=0.0)
    ap.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                    help="expert parallelism: overlap the all-to-alls with this rank's own experts "
                         "(--ep_overlap: auto = on for CUDA, off on CPU)")
    ap.add_argument("--dispatch_dtype", default="fp32", choices=("fp32", "bf16"),
                    help="the all-to-all wire (bytes are still compared with the fp32 minimum)")
    ap.add_argument("--ep_sizes", default="1,world", help="comma list; 'world' = all ranks")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--host_memory", default="keep", choices=("keep", "system"),
                    help="keep: reuse freed host memory (ops/host_memory.py, as the trainer does); "
                         "system: glibc's default")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def run(args) -> tuple[list[dict], str | None]:
    """One record per --ep_sizes entry (collective: every rank), each with what --ep_size auto picks
    here when the world has 2+ ranks; and why it picks it."""
    world = dist.get_world_size()
    sizes = [world if s == "world" else int(s) for s in args.ep_sizes.split(",")]
    records = [bench(args, ep) for ep in sizes]
    why = None
    if world > 1:
        auto_ep_size, why = auto_choice(args, world, max(r["avg_active_experts"] for r in records))
        for r in records:
            r["auto_ep_size"] = auto_ep_size
    return records, why


def report(records: list[dict], why: str | None, args) -> None:
    print(f"{'ep':>3}{'world':>6}{'tokens':>8}{'active':>8}{'MB sent':>10}{'MB min':>9}{'sent/min':>9}"
          f"{'step ms':>9}{'pred ms':>9}{'err%':>6}{'a2a ms':>8}{'drop%':>7}   forward phases (ms)")
    for r in records:
        ratio = r["bytes_sent"] / r["bytes_min"] if r["bytes_min"] else float("nan")
        phases = " ".join(f"{k} {v:.1f}" for k, v in r["ms_phase_median"].items())
        print(f"{r['ep_size']:>3}{r['world']:>6}{r['tokens_per_rank']:>8}{r['avg_active_experts']:>8.2f}"
              f"{r['bytes_sent'] / 1e6:>10.2f}{r['bytes_min'] / 1e6:>9.2f}{ratio:>9.4f}"
              f"{r['ms_step_median']:>9.1f}{r['predicted_ms_step']:>9.1f}{100 * r['prediction_error']:>6.1f}"
              f"{r['ms_a2a_median']:>8.1f}{100 * r['dropped_fraction']:>7.2f}   {phases}")
    if why is not None:
        print(f"--ep_size auto: {why}")
    if args.json:
        write_records(args.json, records, announce=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.host_memory == "keep":
        keep_freed_host_memory()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    records, why = run(args)
    if dist.get_rank() == 0:
        report(records, why, args)
    collectives.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
