"""Gradient checkpointing replays each block's forward in backward: the gradients must be those of
the plain forward, and the replay must record nothing (routing statistics, aux losses and the
balance-bias load count every token once)."""

from __future__ import annotations

import pytest
import torch

from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError

METHODS = {
    "adamole": dict(method="adamole", balance_bias_rate=1e-2),
    "sira": dict(method="sira", top_k=2, capacity_factor=1.0, gate_dropout=0.2),
    "lora": dict(method="lora", rank=8),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def one_step(method: str, checkpointing: bool) -> dict:
    model = tiny_llama()
    cfg = AdapterConfig(**{"num_experts": 4, "rank": 2, "dropout": 0.3, "aux_loss_coeff": 1e-2, **METHODS[method]})
    adapters = inject_adapters(model, cfg)
    torch.manual_seed(1)
    for p in adapters.engine_parameters() + adapters.expert_parameters():  # non-zero B: every path gets gradients
        p.data.normal_(0, 0.1)
    blocks = enable_gradient_checkpointing(model, adapters.context) if checkpointing else 0
    adapters.train(True)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding must stay out of routing in the replay too
    torch.manual_seed(3)  # the dropout masks
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    aux = adapters.aux_loss()
    loss = out.loss + (cfg.aux_loss_coeff * aux if aux is not None else 0.0)
    aux_terms = terms_of(adapters.context)
    loss.backward()
    params = adapters.engine_parameters() + adapters.expert_parameters()
    return {"blocks": blocks, "loss": loss.detach(), "aux_terms": aux_terms,
            "aux_terms_after_backward": terms_of(adapters.context),
            "grads": [p.grad.clone() for p in params], "stats": adapters.context.pop_stats(),
            "loads": [r.routed_load.clone() for r in adapters.routers().values() if r.selection_bias is not None]}


def terms_of(context) -> int:
    """How many layers left an aux loss in this forward."""
    summed = context.aux_sum_and_terms()
    return 0 if summed is None else int(summed[1])


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpointed_step_equals_the_plain_one_and_records_once(method):
    plain, ckpt = one_step(method, False), one_step(method, True)
    assert ckpt["blocks"] == 3
    assert torch.equal(plain["loss"], ckpt["loss"])
    assert len(plain["grads"]) == len(ckpt["grads"]) > 0
    assert all(g.abs().sum() > 0 for g in plain["grads"])
    for a, b in zip(plain["grads"], ckpt["grads"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert ckpt["aux_terms"] == ckpt["aux_terms_after_backward"] == plain["aux_terms"]
    assert plain["stats"].keys() == ckpt["stats"].keys()
    for name in plain["stats"]:
        assert torch.equal(plain["stats"][name], ckpt["stats"][name]), name
    for a, b in zip(plain["loads"], ckpt["loads"]):
        assert torch.equal(a, b)
    assert len(plain["loads"]) == (3 * 4 if method == "adamole" else 0)  # 3 blocks x q, k, v, o


def test_a_model_without_checkpointable_blocks_is_a_config_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapters = inject_adapters(model, AdapterConfig(method="lora", rank=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(model, adapters.context)
