"""The benchmarks' bookkeeping: scaling efficiency baselines and merging accuracy runs."""

import pytest

from benchmarks.accuracy import merge_records, report
from benchmarks.scaling import efficiency


def rec(world, ep, tps, mode="weak"):
    return {"system": "adamole_dist", "method": "adamole", "mode": mode, "nodes": 1, "world": world,
            "ep_size": ep, "tokens_per_s": tps}


def test_scaling_efficiency_measures_both_series_against_the_single_rank_run():
    records = efficiency([rec(1, 1, 100.0), rec(2, 1, 180.0), rec(2, 2, 120.0), rec(4, 4, 200.0)])
    eff = {(r["world"], r["ep_size"]): r["efficiency"] for r in records}
    assert eff[(1, 1)] == 1.0
    assert eff[(2, 1)] == pytest.approx(0.9)
    assert eff[(2, 2)] == pytest.approx(0.6)  # not 1.0: expert parallel starts from the same world-1 run
    assert eff[(4, 4)] == pytest.approx(0.5)


def acc(dataset, method, seed, accuracy, tau=None, active=1.0):
    return {"dataset": dataset, "method": method, "seed": seed, "tau_max": tau, "accuracy": accuracy,
            "avg_active_experts": active}


def test_accuracy_records_merge_by_run_and_report_mean_and_std():
    first = [acc("arc", "lora", 0, 0.40), acc("arc", "lora", 1, 0.50)]
    second = [acc("arc", "lora", 1, 0.44), acc("arc", "adamole", 0, 0.45, tau=0.125, active=3.0),
              acc("arc", "adamole", 0, 0.30, tau=1.0, active=0.1)]
    merged = merge_records(first, second)
    assert len(merged) == 4 and [r["accuracy"] for r in merged if r["method"] == "lora"] == [0.40, 0.44]
    table = report(merged, {"arc": 0.25})
    assert "| majority class | 25.0 |" in table
    assert "| lora | 42.0 ± 2.8 (n=2) | 1.00 |" in table
    assert "| adamole | 45.0 (n=1) | 3.00 |" in table  # the tau_max = 1 run is in the sweep table only
    assert "| 1 | 30.0 (n=1) | 0.10 |" in table


def dec(dataset, method, seed, accuracy, acc_norm, tau=None, active=None):
    r = {"dataset": dataset, "method": method, "seed": seed, "tau_max": tau, "accuracy": accuracy,
         "acc_norm": acc_norm, "zero_shot": method == "zero_shot"}
    if active is not None:
        r.update(avg_active_experts=active, active_by_layer={f"model.layers.{b}.self_attn.q_proj": active - b
                                                             for b in range(2)})
    return r


def test_decoder_grid_reports_against_zero_shot_and_runs_baselines_first():
    from argparse import Namespace

    from benchmarks import decoder_accuracy as grid

    zero = dec("ARC-Easy", "zero_shot", 0, 0.50, 0.46)
    loras = [dec("ARC-Easy", "lora", s, a, a, active=1.0) for s, a in enumerate([0.60, 0.62, 0.64])]
    sweep = [dec("ARC-Easy", "adamole", 0, 0.55, 0.5, tau=t, active=8 - 4 * t) for t in (1 / 8, 1.0)]
    records = grid.merge_records([zero, *loras], sweep + [dec("ARC-Easy", "lora", 2, 0.66, 0.66, active=1.0)])
    assert len(records) == 6  # the rerun of (lora, seed 2) replaced the first
    table = grid.report(records)
    assert "| zero_shot | 50.0 (n=1) | 46.0 (n=1) |" in table
    assert "| lora | 62.7 ± 3.1 (n=3) [+12.7] |" in table  # mean, stdev and the gain over zero-shot in points
    assert "| 1/N |" in table and "| 1 |" in table  # the tau_max sweep
    assert grid.active_by_block(sweep[0]) == {0: 7.5, 1: 6.5}
    args = Namespace(seeds="0,1", methods="lora,adamole", tau_sweep=False)
    runs = grid.planned_runs(args, ["ARC-Easy", "openbookqa"])
    assert runs[:2] == [("ARC-Easy", "zero_shot", 0, None), ("openbookqa", "zero_shot", 0, None)]
    assert [r[2] for r in runs[2:]] == [0, 0, 0, 0, 1, 1, 1, 1]  # every method at seed 0 before seed 1
    sweep_runs = grid.planned_runs(Namespace(seeds="0", methods="", tau_sweep=True), ["ARC-Easy"])
    assert [r[3] for r in sweep_runs] == grid.TAU_SWEEP
