"""ZeRO-3 on 2 gloo ranks, with ep_size 1 and 2, partitions the frozen base but never the
experts, and the experts' gradients (after the expert-data-parallel reduction) equal the
single-process gradients of the same experts on the global batch. See docs/zero3_experts.md."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.launch_utils import free_port

pytestmark = pytest.mark.slow

WORLD = 2
SEQ, PER_RANK = 12, 3


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def adapter_cfg():
    from adamole_dist import AdapterConfig

    return AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0, aux_loss_coeff=0.0)


def global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (WORLD * PER_RANK, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 7:] = 0
    return ids, mask


def randomize_experts(adapters):
    """Random B for all N experts, then this rank's slice: same values whatever the layout."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bank in adapters.expert_banks.values():
            full = torch.randn((adapter_cfg().num_experts,) + tuple(bank.lora_B.shape[1:]), generator=g) * 0.1
            bank.lora_B.copy_(full[bank.first_expert:bank.first_expert + bank.num_experts])


def loss_of(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def worker(rank, port, out, ep_size):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
    from adamole_dist.parallel.layout import build_layout
    from adamole_dist.parallel.local_dispatcher import LocalDispatcher
    from adamole_dist.runtime.process_group import init_distributed
    from adamole_dist.train.expert_optimizer import ExpertOptimizer

    init_distributed()
    layout = build_layout(ep_size, adapter_cfg().num_experts)
    dispatcher = ExpertParallelDispatcher(layout) if ep_size > 1 else LocalDispatcher()
    model = tiny_llama()
    adapters = inject_adapters(model, adapter_cfg(), dispatcher=dispatcher,
                               expert_slice=layout.expert_slice(adapter_cfg().num_experts))
    randomize_experts(adapters)
    ds = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=adapters.engine_parameters(), config=ds)
    ids, mask = global_batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    engine.backward(loss_of(engine, ids[mine], mask[mine]))
    opt = ExpertOptimizer(adapters.expert_parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=WORLD, edp_group=layout.edp_group)
    opt.reduce_gradients()
    base = [p for p in engine.module.parameters() if not p.requires_grad]
    torch.save({
        "expert_grads": {n: (b.lora_A.grad.clone(), b.lora_B.grad.clone()) for n, b in adapters.expert_banks.items()},
        "expert_ids": {n: list(b.expert_ids) for n, b in adapters.expert_banks.items()},
        "experts": {n: b.lora_B.detach().clone() for n, b in adapters.expert_banks.items()},
        "experts_have_ds_attrs": any(hasattr(p, "ds_id") for p in adapters.expert_parameters()),
        "base_all_partitioned": all(hasattr(p, "ds_id") for p in base),
        "base_local": sum(p.ds_tensor.numel() for p in base),
        "base_full": sum(p.ds_numel for p in base),
    }, f"{out}/rank{rank}.pt")
    torch.distributed.barrier()


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def zero3_result(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    mp.start_processes(worker, args=(free_port(), str(out), request.param), nprocs=WORLD, start_method="spawn",
                       join=True)
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_base_partitioned_experts_not(zero3_result):
    ep_size, results = zero3_result
    for r in results:
        assert r["base_all_partitioned"]
        assert not r["experts_have_ds_attrs"]
        assert 0.45 <= r["base_local"] / r["base_full"] <= 0.55
    ids = [set(map(tuple, r["expert_ids"].values())) for r in results]
    if ep_size == 2:  # each EP rank owns different experts, holding different values
        assert ids[0] == {(0, 1)} and ids[1] == {(2, 3)}
        name = next(iter(results[0]["experts"]))
        assert not torch.equal(results[0]["experts"][name], results[1]["experts"][name])
    else:
        assert ids[0] == ids[1] == {(0, 1, 2, 3)}


def test_expert_grads_equal_single_process(zero3_result):
    from adamole_dist.adapters.inject import inject_adapters

    model = tiny_llama()
    adapters = inject_adapters(model, adapter_cfg())
    randomize_experts(adapters)
    ids, mask = global_batch()
    # Global objective: the mean of the ranks' mean losses (what DP averaging optimises).
    losses = [loss_of(model, ids[r * PER_RANK:(r + 1) * PER_RANK], mask[r * PER_RANK:(r + 1) * PER_RANK])
              for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    assert adapters.expert_banks
    _, results = zero3_result
    for name, bank in adapters.expert_banks.items():
        for r in results:
            first, last = r["expert_ids"][name][0], r["expert_ids"][name][-1] + 1
            gA, gB = r["expert_grads"][name]
            torch.testing.assert_close(gA, bank.lora_A.grad[first:last], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(gB, bank.lora_B.grad[first:last], atol=1e-6, rtol=1e-4)
        assert bank.lora_B.grad.abs().sum() > 0
