"""Host reads of tensors computed in the training step (each one stalls a GPU's launch queue), counted
on the CPU around ``train_step`` (benchmarks/common/host_syncs.py): the project's own are a constant per
optimizer step locally -- whatever the depth, the micro batches and capacity -- and add one per
adapted layer's forward under expert parallelism (the split sizes), one more with capacity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.common.host_syncs import HostReads
from benchmarks.common.local_engine import LocalEngine

MODULES_PER_LAYER = 4  # q, k, v, o


class SquareTask:
    def loss(self, model, batch):
        return model(**batch).logits.float().pow(2).mean()


def reads_of_one_step(layers: int, method: str, capacity: float, micro: int, dispatcher=None, expert_slice=None,
                      world: int = 1) -> dict[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.train.expert_optimizer import ExpertOptimizer
    from adamole_dist.train.step import train_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    cfg = AdapterConfig(method=method, num_experts=4, rank=2, dropout=0.0, aux_loss_coeff=0.5, top_k=2,
                        capacity_factor=capacity)
    adapters = inject_adapters(model, cfg, dispatcher=dispatcher, expert_slice=expert_slice)
    adapters.train(True)
    engine = LocalEngine(model, adapters.engine_parameters(), lr=1e-3, weight_decay=0.0, max_grad_norm=1.0,
                         lr_lambda=lambda s: 1.0, gradient_accumulation_steps=micro)
    expert_opt = ExpertOptimizer(adapters.expert_parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0, max_grad_norm=1.0, lr_lambda=lambda s: 1.0, world_size=world,
                                 edp_group=None, ep_group=getattr(dispatcher, "group", None))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (2, 6), generator=g),
                "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])} for _ in range(micro)]
    train_step(engine, SquareTask(), adapters, expert_opt, batches, 0.5)  # warm: first-call work is not counted
    with HostReads() as reads:
        train_step(engine, SquareTask(), adapters, expert_opt, batches, 0.5)
    return {"project": reads.project(), "where": reads.where()}


@pytest.mark.parametrize("method", ["adamole", "mole_topk"])
@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_local_dispatch_reads_a_constant_per_step(method, capacity):
    counts = {(layers, micro): reads_of_one_step(layers, method, capacity, micro)["project"]
              for layers in (1, 3) for micro in (1, 2)}
    # the losses (with the engine's norm) once, the experts' norm once
    assert set(counts.values()) == {2}, counts


def ep_worker(rank, world, out):
    from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
    from adamole_dist.parallel.layout import build_layout

    results = {}
    for method in ("adamole", "mole_topk"):
        for capacity in (0.0, 1.0):
            for layers in (1, 3):
                layout = build_layout(2, 4)
                dispatcher = ExpertParallelDispatcher(layout)
                results[method, capacity, layers] = reads_of_one_step(layers, method, capacity, 2, dispatcher,
                                                                      layout.expert_slice(4), world)
    torch.save(results, Path(out) / f"reads_rank{rank}.pt")


@pytest.mark.slow
def test_expert_parallel_reads_only_split_sizes_per_layer(tmp_path):
    from tests.helpers.mp_harness import run_ranks

    run_ranks(ep_worker, 2, str(tmp_path), timeout=600)
    for rank in range(2):
        results = torch.load(tmp_path / f"reads_rank{rank}.pt")
        for (method, capacity, layers), r in results.items():
            per_forward = 2 if capacity else 1  # split sizes; with capacity also the group's counts
            expected = 2 + 2 * layers * MODULES_PER_LAYER * per_forward  # 2 micro batches, no reads in backward
            assert r["project"] == expected, (method, capacity, layers, r)
