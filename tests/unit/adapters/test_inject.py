"""Injection into tiny Llama and BERT models, and adapter save -> load onto a fresh base."""

import pytest
import torch
import torch.nn as nn

from adamole_dist import AdapterConfig, ConfigError, inject_adapters
from adamole_dist.adapters.files import adapter_state, load_adapter, save_adapter
from adamole_dist.adapters.inject import weight_shape
from adamole_dist.adapters.layer import AdaptedLinear
from tests.conftest import make_tiny_bert, make_tiny_llama

METHODS = ["lora", "mole_topk", "mole_threshold", "sira", "adamole"]


def batch():
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def randomize_adapters(adapters, seed=11):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.layers.values():
            for module in (layer.router, layer.lora, layer.experts if layer.router is not None else None):
                if module is not None:
                    for p in module.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_llama_default_targets_and_trainable_parameters(tiny_llama):
    adapters = inject_adapters(tiny_llama, AdapterConfig(method="adamole"))
    assert len(adapters.layers) == 8  # q,k,v,o in 2 blocks
    assert all(name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in adapters.layers)
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    expert_ids = {id(p) for p in adapters.expert_parameters()}
    assert expert_ids and not expert_ids & {id(p) for p in tiny_llama.parameters()}  # experts outside the model
    assert all(p.requires_grad for p in adapters.expert_parameters())


def test_bert_default_targets_and_head(tiny_bert):
    adapters = inject_adapters(tiny_bert, AdapterConfig(method="lora"), trainable_modules=["classifier"])
    leaves = sorted({n.split("layer.0.")[-1] for n in adapters.layers if "layer.0." in n})
    assert leaves == ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"]
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or ".lora." in n for n in trainable)
    assert not any("intermediate" in n for n in adapters.layers)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_outputs_at_init_equal_the_base_model(method, family):
    make = make_tiny_llama if family == "llama" else make_tiny_bert
    base, adapted = make(), make()
    inject_adapters(adapted, AdapterConfig(method=method))
    ids, mask = batch()
    for m in (None, mask):
        kw = {"input_ids": ids} if m is None else {"input_ids": ids, "attention_mask": m}
        torch.testing.assert_close(adapted(**kw).logits, base(**kw).logits, atol=0, rtol=0)


def test_unknown_target_lists_candidates(tiny_llama):
    with pytest.raises(ConfigError) as e:
        inject_adapters(tiny_llama, AdapterConfig(target_modules=["q_proj", "query"]))
    assert "'query'" in str(e.value) and "candidates" in str(e.value) and "q_proj" in str(e.value)


def test_target_matching_a_non_linear_module(tiny_llama):
    with pytest.raises(ConfigError, match="LlamaAttention"):
        inject_adapters(tiny_llama, AdapterConfig(target_modules=["self_attn"]))


def test_partitioned_weight_shape_comes_from_ds_shape():
    linear = nn.Linear(12, 20)
    linear.weight = nn.Parameter(torch.empty(0))  # what a ZeRO-3 partitioned weight looks like
    linear.weight.ds_shape = torch.Size([20, 12])
    assert weight_shape(linear) == (20, 12)
    model = nn.Sequential()
    model.add_module("proj", linear)
    model.config = type("C", (), {"model_type": "custom"})()
    adapters = inject_adapters(model, AdapterConfig(target_modules=["proj"], num_experts=4, rank=2))
    bank = adapters.expert_banks["proj"]
    assert bank.lora_A.shape == (4, 2, 12) and bank.lora_B.shape == (4, 2, 20)
    assert adapters.layers["proj"].router.gate_weight.shape == (4, 12)


def test_expert_slice_holds_the_same_experts_as_a_full_bank():
    full = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=8))
    torch.manual_seed(0)
    half = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=8), expert_slice=(4, 4))
    for name, bank in half.expert_banks.items():
        assert list(bank.expert_ids) == [4, 5, 6, 7]
        torch.testing.assert_close(bank.lora_A, full.expert_banks[name].lora_A[4:8])


@pytest.mark.parametrize("method", ["adamole", "lora", "sira"])
def test_save_then_load_onto_a_fresh_base_reproduces_outputs(tmp_path, method):
    model = make_tiny_llama()
    adapters = inject_adapters(model, AdapterConfig(method=method))
    randomize_adapters(adapters)
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(tmp_path / "adapter", adapter_state(adapters), adapters.cfg,
                 {"task_type": "causal_lm", "trainable_modules": []})
    fresh = make_tiny_llama()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.cfg == adapters.cfg
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
    assert not list(tmp_path.glob(".adapter*")), "temporary directories left behind"


def test_save_load_with_trained_head(tmp_path):
    model = make_tiny_bert()
    adapters = inject_adapters(model, AdapterConfig(method="adamole"), trainable_modules=["classifier"])
    randomize_adapters(adapters)
    with torch.no_grad():
        model.classifier.weight.normal_()
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    save_adapter(tmp_path / "a", adapter_state(adapters), adapters.cfg,
                 {"task_type": "seq_cls", "trainable_modules": ["classifier"]})
    fresh = make_tiny_bert()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


def test_missing_tensor_is_named_and_resave_replaces(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama()
    adapters = inject_adapters(model, AdapterConfig(method="adamole"))
    meta = {"task_type": "causal_lm", "trainable_modules": []}
    save_adapter(tmp_path / "a", adapter_state(adapters), adapters.cfg, meta)
    save_adapter(tmp_path / "a", adapter_state(adapters), adapters.cfg, meta)  # replaces atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    victim = next(k for k in tensors if ".experts.5.lora_B" in k)
    del tensors[victim]
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=victim.replace(".", r"\.")):
        load_adapter(make_tiny_llama(), tmp_path / "a")


def test_adapted_layer_wraps_the_original_linear(tiny_llama):
    q = tiny_llama.model.layers[0].self_attn.q_proj
    inject_adapters(tiny_llama, AdapterConfig())
    wrapped = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, AdaptedLinear) and wrapped.base_layer is q
    assert not q.weight.requires_grad
