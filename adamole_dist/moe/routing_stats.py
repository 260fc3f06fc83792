"""Routing statistics: what each adapted layer accumulates per forward (one float64 vector), its
per-layer summary, the token-weighted summary over layers that the trainer logs, launch/eval.py
prints and the benchmarks record, and the per-layer table both print. Pure functions; sum the vectors
over ranks before summarizing (train/reporting.py: routing_over_ranks).

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Layout of the per-layer statistics vector accumulated during training and evaluation.
STAT_TOKENS, STAT_ACTIVE, STAT_TAU, STAT_NONE, STAT_DROPPED, STAT_ROUTED = range(6)
NUM_SCALAR_STATS = 6


@torch.no_grad()
def routing_stats(
    kept_TN: torch.Tensor,
    routed_TN: torch.Tensor,
    weights_TN: torch.Tensor,
    valid_T: torch.Tensor,
    tau_T: torch.Tensor | None,
) -> torch.Tensor:
    """Sums over valid tokens: [tokens, active pairs, tau, tokens with no active expert,
    dropped pairs, routed pairs, per-expert load x N] as float64 (accumulate, then divide)."""
    v_T = valid_T.to(torch.float64)
    kept = kept_TN.to(torch.float64) * v_T.unsqueeze(-1)
    routed = routed_TN.to(torch.float64) * v_T.unsqueeze(-1)
    no_delta_T = (weights_TN.sum(-1) <= 0).to(torch.float64) * v_T
    tau_sum = (tau_T.to(torch.float64) * v_T).sum() if tau_T is not None else v_T.new_zeros(())
    scalars = torch.stack(
        [v_T.sum(), kept.sum(), tau_sum, no_delta_T.sum(), routed.sum() - kept.sum(), routed.sum()]
    )
    return torch.cat([scalars, kept.sum(0)])


def summarize_stats(stats: torch.Tensor, has_tau: bool) -> dict:
    """Per-layer summary of an accumulated statistics vector."""
    s = stats.double().cpu()
    tokens = max(s[STAT_TOKENS].item(), 1.0)
    active = s[STAT_ACTIVE].item()
    load = s[NUM_SCALAR_STATS:]
    load_share = (load / load.sum()).tolist() if load.sum() > 0 else [0.0] * len(load)
    return {
        "tokens": int(s[STAT_TOKENS].item()),
        "mean_active_experts": active / tokens,
        "mean_tau": s[STAT_TAU].item() / tokens if has_tau else None,
        "no_active_fraction": s[STAT_NONE].item() / tokens,
        "dropped_pairs": int(s[STAT_DROPPED].item()),
        "dropped_fraction": s[STAT_DROPPED].item() / max(s[STAT_ROUTED].item(), 1.0),
        "expert_load": load_share,
    }


def summarize_routing(stats_by_layer: dict[str, torch.Tensor], has_tau: bool) -> dict:
    """Per-layer summaries (sorted by name) and their token-weighted means over layers: what the
    trainer logs, launch/eval.py prints and the benchmarks record. Sum the statistics over ranks
    first where there are several (train/reporting.py: routing_over_ranks). A layer that saw no token
    since the statistics were last read is left out."""
    layers = {n: summarize_stats(stats_by_layer[n], has_tau) for n in sorted(stats_by_layer)}
    layers = {n: summary for n, summary in layers.items() if summary["tokens"] > 0}  # layers that saw no token
    if not layers:
        return {"overall": {}, "layers": {}}
    tokens = sum(v["tokens"] for v in layers.values()) or 1

    def weighted(key: str) -> float:
        return sum(v[key] * v["tokens"] for v in layers.values()) / tokens

    overall = {"mean_active_experts": weighted("mean_active_experts"),
               "no_active_fraction": weighted("no_active_fraction"),
               "dropped_pairs": sum(v["dropped_pairs"] for v in layers.values())}
    if has_tau:
        overall["mean_tau"] = weighted("mean_tau")
    return {"overall": overall, "layers": layers}


def print_routing_table(layers: dict, say=log.info) -> None:
    """One line per layer of a summary's "layers": active experts, tau, tokens with none, dropped pairs, load."""
    if not layers:
        return
    say(f"  {'layer':<52}{'active':>8}{'tau':>8}{'none%':>7}{'drop%':>7}  load min/max")
    for name, s in layers.items():
        tau = f"{s['mean_tau']:.4f}" if s["mean_tau"] is not None else "-"
        load = s["expert_load"]
        say(f"  {name[-52:]:<52}{s['mean_active_experts']:>8.2f}{tau:>8}{100 * s['no_active_fraction']:>7.1f}"
            f"{100 * s['dropped_fraction']:>7.1f}  {min(load):.3f}/{max(load):.3f}")
