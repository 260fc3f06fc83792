"""costmodel/calibration.py over a real 2-rank gloo group: every rate it measures is usable by the
cost model, and ranks with different workloads still run the same collectives (a mismatch would
abort gloo or hang)."""

import json
import math

from tests.helpers.mp_harness import run_ranks


def _calibrate(rank, world, out_dir):
    from adamole_dist.config.adapter import AdapterConfig
    from adamole_dist.costmodel.calibration import calibrate
    from adamole_dist.costmodel.placement import Workload, predict_expert_parallel, predict_replicated

    # Ranks disagree on tokens and active experts (as a job's ranks do on their batches).
    w = Workload(layers=[(64, 48)] * 3, num_experts=4, rank=2, tokens_per_rank=96 + 40 * rank,
                 avg_active=1.5 + rank, world_size=world, act_bytes=4, overlap=True)
    comm, comp = calibrate(w, "cpu", adapter=AdapterConfig(method="adamole", num_experts=4, rank=2))
    rep, ep = predict_replicated(w, comm, comp), predict_expert_parallel(w, 2, comm, comp)
    (out_dir / f"{rank}.json").write_text(json.dumps({"comm": vars(comm), "comp": vars(comp),
                                                      "rep": rep.total_s, "ep": ep.total_s}))


def test_calibration_over_two_gloo_ranks_gives_usable_rates(tmp_path):
    run_ranks(_calibrate, 2, tmp_path)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        comm, comp = got["comm"], got["comp"]
        for name in ("dense_s_per_unit", "grouped_s_per_unit", "route_s_per_unit", "copy_s_per_byte",
                     "optimizer_s_per_param", "layer_s_per_param"):
            assert 0 < comp[name] < 1e-3 and math.isfinite(comp[name]), name
        assert comp["dispatch_fixed_s"] >= 0  # measured: the group is the EP group of 2
        assert -1 <= comp["overlap"] <= 1  # measured because the workload overlaps
        for name in ("alpha_intra", "beta_intra", "a2a_alpha_scale", "a2a_beta_scale"):
            assert 0 < comm[name] and math.isfinite(comm[name]), name
        assert comm["ranks_per_node"] == 2
        assert 0 < got["rep"] < 10 and 0 < got["ep"] < 10


def test_one_process_calibrates_compute_and_prices_no_communication():
    from adamole_dist.config.adapter import AdapterConfig
    from adamole_dist.costmodel.calibration import calibrate
    from adamole_dist.costmodel.placement import Workload, predict_replicated

    w = Workload(layers=[(64, 64)], num_experts=4, rank=2, tokens_per_rank=64, avg_active=2.0, world_size=1,
                 act_bytes=4)
    comm, comp = calibrate(w, "cpu", adapter=AdapterConfig(method="mole_topk", num_experts=4, rank=2, top_k=2))
    assert comp.dense_s_per_unit > 0 and comp.layer_s_per_param > 0 and comp.dispatch_fixed_s == 0
    assert predict_replicated(w, comm, comp).comm_s == 0


def test_the_dispatch_fixed_cost_is_what_the_bank_and_latencies_leave():
    """The EP layer on a handful of tokens, less its two bank runs over N/J experts (each priced as
    that share of the local layer) and its latencies. (A precedence slip once floored the bank runs
    to zero: the fixed cost of r=256 experts came out 21 ms instead of 10, +19 % on the step.)"""
    from adamole_dist.costmodel.calibration import dispatch_fixed_cost

    assert math.isclose(dispatch_fixed_cost(0.030, 0.011, 8, 2, 0.001), 0.030 - 0.011 - 0.001)
    assert math.isclose(dispatch_fixed_cost(0.030, 0.012, 8, 4, 0.0), 0.030 - 0.006)
    assert dispatch_fixed_cost(0.010, 0.011, 8, 2, 0.001) == 0.0  # never negative, whatever the noise
