"""Capacity 0 in an expert-parallel group: nothing routed anywhere in the group (adamole with
tau_max 1, mole_threshold at 0.99, batches that are all padding) keeps nothing on every rank of
the group, joins every collective, and gives the outputs a single process gives.

Capacity is per EP group, so the single-process reference runs each group's ranks' batches
together (world 4, ep_size 2: groups {0,1} and {2,3} are independent)."""

from pathlib import Path

import pytest
import torch

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.moe.routing_stats import STAT_ACTIVE, STAT_ROUTED
from adamole_dist.parallel.local_dispatcher import LocalDispatcher
from tests.helpers.mp_harness import run_ranks
from tests.integration.test_expert_parallel import tiny_llama

pytestmark = pytest.mark.slow

N, SEQ, PER_RANK = 4, 8, 2
CASES = {  # name: (world, ep_size, adapter options, ranks whose batch is all padding)
    "adamole_tau_max_1_w2": (2, 2, dict(method="adamole", tau_max=1.0, capacity_factor=1.0), []),
    "threshold_0.99_w2": (2, 2, dict(method="mole_threshold", threshold=0.99, capacity_factor=1.0), []),
    "topk_all_padding_w2": (2, 2, dict(method="mole_topk", top_k=2, capacity_factor=1.0), [0, 1]),
    "adamole_tau_max_1_w4": (4, 4, dict(method="adamole", tau_max=1.0, capacity_factor=1.0), []),
    "threshold_all_padding_w4": (4, 4, dict(method="mole_threshold", capacity_factor=1.0, drop_policy="position"),
                                 [0, 1, 2, 3]),
    "sira_w4_ep2_two_padding_ranks": (4, 2, dict(method="sira", top_k=2, capacity_factor=1.0, gate_dropout=0.0),
                                      [2, 3]),
}


def build(options: dict, dispatcher=None, expert_slice=None):
    cfg = AdapterConfig(num_experts=N, rank=2, dropout=0.0, aux_loss_coeff=1e-2, **options)
    model = tiny_llama()
    adapters = inject_adapters(model, cfg, dispatcher=dispatcher or LocalDispatcher(), expert_slice=expert_slice)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if cfg.method == "adamole" and cfg.tau_max == 1.0:  # tau = sigmoid(~20) ~ 1 > every p_i: nothing fires
            for router in adapters.routers().values():
                router.threshold_bias.fill_(20.0)
        for bank in adapters.expert_banks.values():
            full = torch.randn((N,) + tuple(bank.lora_B.shape[1:]), generator=g) * 0.2
            bank.lora_B.copy_(full[bank.first_expert:bank.first_expert + bank.num_experts])
    return model.train(), adapters


def batch(world: int, padding_ranks: list[int]):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (world * PER_RANK, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    for r in padding_ranks:
        mask[r * PER_RANK:(r + 1) * PER_RANK] = 0
    return ids, mask


def worker(rank, world, out):
    from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
    from adamole_dist.parallel.layout import build_layout

    for name, (case_world, ep, options, padding) in CASES.items():
        if case_world != world:
            continue
        layout = build_layout(ep, N)
        model, adapters = build(options, ExpertParallelDispatcher(layout), layout.expert_slice(N))
        ids, mask = batch(world, padding)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        logits = model(input_ids=ids[mine], attention_mask=mask[mine]).logits
        (torch.nan_to_num(logits).pow(2).mean() + adapters.cfg.aux_loss_coeff * adapters.aux_loss()).backward()
        stats = sum(adapters.context.stats.values())
        counters = next(iter(adapters.layers.values())).dispatcher.counters
        torch.save({"logits": logits.detach(), "kept": stats[STAT_ACTIVE].item(), "routed": stats[STAT_ROUTED].item(),
                    "calls": counters.calls}, Path(out) / f"{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("empty")
    for world in (2, 4):
        run_ranks(worker, world, str(out), timeout=300)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_empty_group_keeps_nothing_and_matches_one_process(results, name):
    world, ep, options, padding = CASES[name]
    ranks = [torch.load(results / f"{name}_rank{r}.pt") for r in range(world)]
    assert len({r["calls"] for r in ranks}) == 1 and ranks[0]["calls"] > 0  # every rank joined every all-to-all
    ids, mask = batch(world, padding)
    for first in range(0, world, ep):  # each EP group against one process running the group's batches
        group = range(first, first + ep)
        rows = slice(first * PER_RANK, (first + ep) * PER_RANK)
        model, adapters = build(options)
        with torch.no_grad():
            logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        kept = sum(adapters.context.stats.values())[STAT_ACTIVE].item()
        assert sum(ranks[r]["kept"] for r in group) == kept
        for i, r in enumerate(group):
            torch.testing.assert_close(ranks[r]["logits"], logits[i * PER_RANK:(i + 1) * PER_RANK], atol=1e-5,
                                       rtol=1e-5, equal_nan=True)
        empty = all(r in padding for r in group) or options.get("tau_max") == 1.0 or options.get("threshold") == 0.99
        if empty:
            assert all(ranks[r]["kept"] == 0 and ranks[r]["routed"] == 0 for r in group), "nothing routed, nothing kept"
        else:  # the other group of the sira case routes, and its capacity drops pairs
            assert 0 < kept < sum(ranks[r]["routed"] for r in group)
