"""What a run reports besides losses: routing over all ranks, parameter memory per rank, the
per-layer routing table, and durations as an operator reads them in a log file."""

from __future__ import annotations

import logging

import torch

from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.parallel import collectives

log = logging.getLogger(__name__)


def routing_over_ranks(stats_by_layer: dict[str, torch.Tensor], has_tau: bool) -> dict:
    """``summarize_routing`` of the statistics summed over every rank (collective: all ranks call
    it, with the same layer names)."""
    if not stats_by_layer:
        return summarize_routing({}, has_tau)
    names = sorted(stats_by_layer)
    flat = collectives.all_reduce_sum(torch.stack([stats_by_layer[n].double() for n in names]))
    return summarize_routing(dict(zip(names, flat)), has_tau)


def param_bytes(module: torch.nn.Module) -> dict:
    """Bytes of parameters this rank holds (ZeRO-3 shard where partitioned) and their full size."""
    out = {"frozen_local": 0, "frozen_full": 0, "trainable_local": 0, "trainable_full": 0}
    for p in module.parameters():
        es = p.element_size() if not hasattr(p, "ds_tensor") else p.ds_tensor.element_size()
        local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_local"] += local * es
        out[f"{kind}_full"] += full * es
    return out


def memory_per_rank(module: torch.nn.Module, expert_parameters: list[torch.nn.Parameter]) -> list[dict]:
    """``param_bytes`` plus the experts each rank holds, of every rank (collective)."""
    mine = param_bytes(module)
    mine["experts_local"] = sum(p.numel() * p.element_size() for p in expert_parameters)
    return collectives.all_gather_objects(mine)


def print_memory(everyone: list[dict], say=log.info) -> None:
    mb = 1 / 2**20
    for r, b in enumerate(everyone):
        say(f"  rank {r}: frozen base {b['frozen_local'] * mb:8.2f} MB of {b['frozen_full'] * mb:8.2f} MB"
            f" | trainable (engine) {b['trainable_local'] * mb:6.2f} MB | experts {b['experts_local'] * mb:6.2f} MB")


def print_routing_table(layers: dict, say=log.info) -> None:
    if not layers:
        return
    say(f"  {'layer':<52}{'active':>8}{'tau':>8}{'none%':>7}{'drop%':>7}  load min/max")
    for name, s in layers.items():
        tau = f"{s['mean_tau']:.4f}" if s["mean_tau"] is not None else "-"
        load = s["expert_load"]
        say(f"  {name[-52:]:<52}{s['mean_active_experts']:>8.2f}{tau:>8}{100 * s['no_active_fraction']:>7.1f}"
            f"{100 * s['dropped_fraction']:>7.1f}  {min(load):.3f}/{max(load):.3f}")


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
