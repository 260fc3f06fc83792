"""The placement cost model: its formulas, the issue's worked example, and the choice it makes."""

import pytest

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.parallel.placement import (
    CommModel,
    ComputeModel,
    Workload,
    adapter_workload,
    choose_ep_size,
    destination_fraction,
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
    assert {p.placement for p in preds} == {"replicated", "zero_sharded", "expert_parallel"}


def test_ring_all_reduce_and_all_to_all_formulas():
    comm = CommModel(alpha_intra=1e-5, beta_intra=1e9, ranks_per_node=8)
    assert comm.all_reduce(1e9, 4) == pytest.approx(2 * 3 / 4 * 1.0 + 6e-5)
    assert comm.all_reduce(1e9, 1) == 0.0
    assert comm.all_to_all(2e9, 4) == pytest.approx(2.0 + 3e-5)
    inter = CommModel(alpha_intra=1e-5, beta_intra=1e9, alpha_inter=1e-4, beta_inter=1e8, ranks_per_node=2)
    assert inter.all_reduce(1e9, 4) > comm.all_reduce(1e9, 4)  # spans nodes: the slow link


def test_destination_fraction():
    assert destination_fraction(8, 8, 2) == pytest.approx(1.0)
    assert destination_fraction(0, 8, 2) == 0.0
    assert destination_fraction(2, 8, 8) == pytest.approx(0.25)  # one expert per rank: P(expert chosen)
    assert destination_fraction(2, 8, 2) < destination_fraction(4, 8, 2)


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
    assert all(p.detail["expert_memory_bytes"] <= budget for p in preds
               if p.placement != "zero_sharded" and p.ep_size == ep_size)


def test_predictions_scale_sensibly():
    w = llama7b_workload(world_size=8)
    comm, comp = CommModel(), ComputeModel()
    more_tokens = llama7b_workload(tokens_per_rank=8192, world_size=8)
    assert predict_replicated(more_tokens, comm, comp).compute_s == pytest.approx(
        2 * predict_replicated(w, comm, comp).compute_s)
    assert predict_expert_parallel(more_tokens, 8, comm, comp).comm_s > predict_expert_parallel(w, 8, comm, comp).comm_s
    names = [p.placement for p in predict_all(w, comm, comp)]
    assert names.count("expert_parallel") == 3  # ep 2, 4, 8 divide both 8 ranks and 8 experts
