"""The placement cost model: its formulas, the issue's worked example, and the choice it makes."""

import pytest

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.costmodel.dry_run import dispatch_traffic
from adamole_dist.costmodel.placement import (
    CommModel,
    ComputeModel,
    Workload,
    adapter_workload,
    choose_ep_size,
    predict_all,
    predict_expert_parallel,
    predict_replicated,
)


def llama7b_workload(tokens_per_rank: int = 4096, world_size: int = 8, avg_active: float = 4.0) -> Workload:
    """32 layers x q,k,v,o (4096 x 4096), 8 experts x r=4, bf16 activations: the worked example."""
    return Workload(layers=[(4096, 4096)] * (32 * 4), num_experts=8, rank=4, tokens_per_rank=tokens_per_rank,
                    avg_active=avg_active, world_size=world_size, act_bytes=2)


def test_adapter_workload_takes_shapes_and_active_experts_from_the_config():
    layers = [(384, 384)] * 4
    w = adapter_workload(layers, AdapterConfig(method="mole_topk", num_experts=8, rank=4, top_k=2), 512, 4)
    assert (w.num_experts, w.rank, w.avg_active, w.tokens_per_rank, w.world_size) == (8, 4, 2.0, 512, 4)
    assert adapter_workload(layers, AdapterConfig(method="adamole", num_experts=8), 512, 4).avg_active == 4.0
    assert adapter_workload(layers, AdapterConfig(method="adamole"), 512, 4, avg_active=3.2).avg_active == 3.2


def test_llama7b_example_expert_gradients_and_token_traffic():
    w = llama7b_workload(tokens_per_rank=4096, world_size=8, avg_active=4.0)
    assert w.expert_param_count * 4 == pytest.approx(134.2e6, rel=1e-3)  # 8 experts x r=4 on q,k,v,o, fp32
    ep = predict_expert_parallel(w, 8, CommModel(), ComputeModel())
    assert ep.detail["a2a_bytes_sent"] > 20 * ep.detail["grad_allreduce_bytes"]  # many GB of tokens vs MBs
    assert ep.detail["a2a_bytes_sent"] > 1e9
    ep_size, preds, why = choose_ep_size(w, CommModel(), ComputeModel())
    assert ep_size == 1 and "replicated" in why
    assert {p.placement for p in preds} == {"replicated", "expert_parallel"}


def test_ring_all_reduce_and_all_to_all_formulas():
    comm = CommModel(alpha_intra=1e-5, beta_intra=1e9, ranks_per_node=8)
    assert comm.all_reduce(1e9, 4) == pytest.approx(2 * 3 / 4 * 1.0 + 6e-5)
    assert comm.all_reduce(1e9, 1) == 0.0
    assert comm.all_to_all(2e9, 4) == pytest.approx(2.0 + 3e-5)
    inter = CommModel(alpha_intra=1e-5, beta_intra=1e9, alpha_inter=1e-4, beta_inter=1e8, ranks_per_node=2)
    assert inter.all_reduce(1e9, 4) > comm.all_reduce(1e9, 4)  # spans nodes: the slow link


@pytest.mark.parametrize("avg_active, num_experts, ep_size, fraction", [
    (2, 8, 8, 0.25),  # one expert per rank: P(that expert chosen)
    (1, 8, 2, 0.5),  # one expert: on either rank
    (2.5, 8, 4, 1 - (1 - 2.5 / 8) ** 2),  # threshold routing: each expert on its own
    (2, 8, 4, 1 - 15 / 28),  # top-2: neither on the rank, C(6,2)/C(8,2)
    (0, 8, 2, 0.0),
])
def test_the_dry_run_sends_the_rows_uniform_routing_implies(avg_active, num_experts, ep_size, fraction):
    """The rows the real dispatcher sends on the dry run's sampled routing: each token once to every
    other rank holding one of its experts, in the closed form of uniform routing."""
    got = dispatch_traffic(4096, 64, 64, num_experts, 4, ep_size, avg_active)
    assert got.rows_sent == pytest.approx(4096 * (ep_size - 1) * fraction, rel=0.05, abs=1)
    assert not got.send_all


def test_the_dry_run_scales_to_the_workloads_tokens_and_sends_every_token_when_one_rank_needs_nearly_all():
    small, large = (dispatch_traffic(t, 64, 64, 8, 4, 2, 7.5) for t in (512, 8192))
    assert small.send_all and small.rows_sent == 512 and large.rows_sent == 8192
    assert large.bytes_sent == pytest.approx(16 * small.bytes_sent)
    # out: rows (64 fp32) and routing columns (4 fp32); back: deltas; the backward the same again
    assert large.exchanges_fwd == pytest.approx((8192 * 64 * 4, 8192 * 4 * 4, 8192 * 64 * 4))
    assert sorted(large.exchanges_bwd) == pytest.approx(sorted(large.exchanges_fwd))


def test_expert_parallel_wins_for_few_tokens_and_huge_experts():
    """Large experts and few tokens: all-reducing gradients costs more than moving tokens."""
    w = Workload(layers=[(4096, 4096)] * 8, num_experts=64, rank=512, tokens_per_rank=64, avg_active=2,
                 world_size=8)
    comm = CommModel(beta_intra=10e9, beta_inter=10e9)
    ep_size, preds, _ = choose_ep_size(w, comm, ComputeModel())
    assert ep_size > 1
    rep = next(p for p in preds if p.placement == "replicated")
    assert min(p.total_s for p in preds if p.placement == "expert_parallel") < rep.total_s


def test_memory_budget_excludes_replicated_experts():
    w = llama7b_workload(world_size=8)
    budget = 4 * w.expert_param_count * 4 / 4  # replicated needs 4x params; allow a quarter of that
    ep_size, preds, _ = choose_ep_size(w, CommModel(), ComputeModel(), expert_memory_budget_bytes=budget)
    assert ep_size >= 4
    assert all(p.detail["expert_memory_bytes"] <= budget for p in preds if p.ep_size == ep_size)


def test_predictions_scale_sensibly():
    w = llama7b_workload(world_size=8)
    comm, comp = CommModel(), ComputeModel()
    more_tokens = llama7b_workload(tokens_per_rank=8192, world_size=8)
    assert predict_replicated(more_tokens, comm, comp).detail["experts_s"] == pytest.approx(
        2 * predict_replicated(w, comm, comp).detail["experts_s"])
    assert predict_expert_parallel(more_tokens, 8, comm, comp).comm_s > predict_expert_parallel(w, 8, comm, comp).comm_s
    names = [p.placement for p in predict_all(w, comm, comp)]
    assert names.count("expert_parallel") == 3  # ep 2, 4, 8 divide both 8 ranks and 8 experts


def test_two_ranks_with_dense_routing_send_every_token_and_skip_the_gather():
    w = Workload(layers=[(2048, 2048)], num_experts=8, rank=4, tokens_per_rank=4096, avg_active=7.5, world_size=2,
                 act_bytes=4)
    ep = predict_expert_parallel(w, 2, CommModel(), ComputeModel())
    assert ep.detail["send_all"] and ep.detail["rows_sent"] == 4096
    sparse = predict_expert_parallel(Workload(**{**w.__dict__, "avg_active": 1.0}), 2, CommModel(), ComputeModel())
    assert not sparse.detail["send_all"] and sparse.detail["rows_sent"] == pytest.approx(2048, rel=0.05)  # sampled


def test_a_bf16_wire_halves_the_rows_bytes_and_their_time():
    w = Workload(layers=[(2048, 2048)], num_experts=8, rank=4, tokens_per_rank=4096, avg_active=4.0, world_size=2,
                 act_bytes=4)
    comm = CommModel(alpha_intra=0.0, beta_intra=1e9)
    fp32 = predict_expert_parallel(w, 2, comm, ComputeModel())
    bf16 = predict_expert_parallel(Workload(**{**w.__dict__, "wire_bytes": 2}), 2, comm, ComputeModel())
    routing = 2 * fp32.detail["rows_sent"] * 4 * 4  # the fp32 routing columns do not shrink
    assert bf16.detail["a2a_bytes_sent"] - routing == pytest.approx((fp32.detail["a2a_bytes_sent"] - routing) / 2)
    assert bf16.detail["a2a_s"] < 0.55 * fp32.detail["a2a_s"]
    assert bf16.detail["copy_s"] > fp32.detail["copy_s"]  # the casts to and from the wire are copies


def test_overlap_hides_at_most_the_exchanges_and_at_most_the_own_compute():
    w = Workload(layers=[(2048, 2048)] * 4, num_experts=8, rank=4, tokens_per_rank=4096, avg_active=4.0,
                 world_size=2, act_bytes=4)
    comm = CommModel(alpha_intra=1e-5, beta_intra=1e9)
    waited = predict_expert_parallel(w, 2, comm, ComputeModel(dense_s_per_unit=1e-10))
    overlapped = predict_expert_parallel(Workload(**{**w.__dict__, "overlap": True}), 2, comm,
                                         ComputeModel(dense_s_per_unit=1e-10))
    hidden = overlapped.detail["hidden_s"]
    assert 0 < hidden <= waited.detail["a2a_s"]
    # the halves' deltas and x's gradients are concatenated, and the deltas summed after (never fused
    # under overlap): three more copies of a token's values per layer
    halves = overlapped.detail["copy_s"] - waited.detail["copy_s"]
    assert halves == pytest.approx(4 * (4096 * 2048 * 4 * 3) * ComputeModel().copy_s_per_byte, rel=0.03)
    assert overlapped.total_s == pytest.approx(waited.total_s - hidden + halves)
    own = 4 * 4096 * 4 * 4 * 4096 * 1e-10  # the own share's compute (fwd + bwd) over the four layers
    # each half of it (forward and backward alike) runs beside one exchange: at most all of it hides
    assert hidden <= own + 1e-12
    none = predict_expert_parallel(Workload(**{**w.__dict__, "overlap": True}), 2, comm,
                                   ComputeModel(dense_s_per_unit=1e-10, overlap=0.0))
    assert none.total_s == pytest.approx(waited.total_s + halves)  # measured: gloo on CPU hides nothing


def test_sparse_banks_take_the_grouped_path_like_the_dispatch():
    comp = ComputeModel(dense_s_per_unit=1.0, grouped_s_per_unit=1000.0)
    assert comp.experts_s(10, 8, 4, 2.0, 1, 1) == 10 * 8 * 4 * 2  # N*r <= 128: always dense
    assert comp.experts_s(10, 8, 256, 1.0, 1, 1) == 10 * 1 * 2 * 1000  # one of 8 r=256 experts: grouped
