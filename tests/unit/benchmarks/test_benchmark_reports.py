"""The benchmarks' bookkeeping: scaling efficiency baselines and merging accuracy runs."""

import pytest

from benchmarks.accuracy.accuracy import merge_records, report
from benchmarks.scaling.scaling import efficiency


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

    from benchmarks.accuracy import decoder_accuracy as grid

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


def link_record(ep_size, ms, predicted, auto):
    return {"ep_size": ep_size, "ms_step_median": ms, "predicted_ms_step": predicted, "auto_ep_size": auto,
            "calibration": {"beta_Bps": 40e6, "a2a_beta_Bps": 30e6}}


def test_shaped_link_rates_parse_as_tc_writes_them_and_rows_compare_with_the_payload_rate():
    from benchmarks.placement.shaped_links import parse_rate, summarise, table

    assert parse_rate("none") is None
    assert parse_rate("400mbit") == pytest.approx(50e6)  # tc: bits per second
    assert parse_rate("1gbit") == pytest.approx(125e6)
    assert parse_rate("12500000") == 12.5e6  # bytes per second
    probe = {"bytes": 4 << 20, "alpha_s": 2e-4, "beta_Bps": 47.8e6, "a2a_beta_Bps": 23.9e6, "a2a_alpha_s": 3e-4}
    row = summarise(50e6, probe, [link_record(1, 49.0, 47.0, 2), link_record(2, 11.0, 20.0, 2)])
    assert row["set_payload_Bps"] == pytest.approx(50e6 * 1448 / 1514)  # tbf counts frames, TCP moves payload
    assert row["beta_error"] == pytest.approx(47.8e6 / row["set_payload_Bps"] - 1, abs=1e-4)
    assert row["a2a_beta_error"] == pytest.approx(-0.5, abs=0.01)
    assert row["measured_winner"] == 2 and row["auto_ep_size"] == 2 and row["job_beta_Bps"] == 40e6
    unshaped = summarise(None, probe, [link_record(1, 10.0, 9.0, 1), link_record(2, 16.0, 17.0, 1)])
    assert unshaped["beta_error"] is None and unshaped["measured_winner"] == 1
    text = table([unshaped, row])
    assert ("unshaped" in text and "+0.0%" not in text.splitlines()[1]
            and text.splitlines()[2].split()[-2:] == ["EP", "EP"])


def test_sft_training_run_reads_curves_against_the_step0_evaluation(tmp_path):
    import json

    from benchmarks.sft.sft_training_run import finished, summarise

    run = tmp_path / "adamole"
    run.mkdir()
    rows = [{"step": 0, "kind": "eval", "time": 10.0, "eval_loss": 1.6, "perplexity": 4.95, "total": 9,
             "eval_tokens": 900},
            {"step": 10, "kind": "train", "time": 20.0, "task_loss": 1.5, "tokens_per_s": 100.0,
             "padding_fraction": 0.1},
            {"step": 20, "kind": "train", "time": 30.0, "task_loss": 1.4, "tokens_per_s": 300.0,
             "padding_fraction": 0.2},
            {"step": 20, "kind": "eval", "time": 40.0, "eval_loss": 1.5, "perplexity": 4.48, "total": 9,
             "eval_tokens": 900, "mean_active_experts": 3.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "ki')
    assert not finished(run, 20)  # no adapter saved yet
    (run / "adapter").mkdir()
    assert finished(run, 20) and not finished(run, 30)
    r = summarise("adamole", run)
    assert r["zero_shot_loss"] == 1.6 and r["final_loss"] == 1.5 and r["beats_base"]
    assert r["gain_over_zero_shot"] == pytest.approx(0.1) and r["median_tokens_per_s"] == 200.0
    assert [p["step"] for p in r["curve"]] == [0, 20] and r["wall_s"] == 30.0
