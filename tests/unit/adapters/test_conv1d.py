"""GPT-2's Conv1D (weight stored [in, out], y = x @ W + b) is adapted like the nn.Linear holding the same
weight transposed: the same outputs and gradients for every method (so every test of the adapted linear
covers it), the same shapes under ZeRO-3, and a merged LoRA folds into the transposed weight."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from adamole_dist import AdapterConfig, inject_adapters
from adamole_dist.adapters.export import AdapterSource, merge_into
from adamole_dist.adapters.files import adapter_state, save_adapter
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.adapters.targets import weight_OI, weight_shape
from tests.helpers.saved_adapters import randomize_adapters
from tests.helpers.tiny_architectures import tiny_model

METHODS = ["lora", "mole_topk", "mole_threshold", "sira", "adamole"]


def conv_and_linear(d_in=10, d_out=12):
    torch.manual_seed(0)
    conv = Conv1D(d_out, d_in)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return conv, linear


def adapter_tensors(layer) -> list[torch.Tensor]:
    bank = layer.lora if layer.lora is not None else layer.experts
    return list(bank.parameters()) + (list(layer.router.parameters()) if layer.router is not None else [])


@pytest.mark.parametrize("method", METHODS)
def test_adapted_conv1d_equals_the_adapted_linear_of_its_transposed_weight(method):
    conv, linear = conv_and_linear()
    cfg = AdapterConfig(method=method, num_experts=4, rank=2, dropout=0.0, top_k=2, gate_dropout=0.0)
    layers = [adapt_linear(base, cfg, name="proj") for base in (conv, linear)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same non-zero adapter values in both (a fresh B is zero)
        for a, b in zip(*(adapter_tensors(layer) for layer in layers)):
            a.copy_(torch.randn(a.shape, generator=g) * 0.3)
            b.copy_(a)
    for layer in layers:
        layer.train(True)
    x = torch.randn(3, 5, 10, generator=g)
    xs = [x.clone().requires_grad_(True) for _ in layers]
    outs = [layer(xi) for layer, xi in zip(layers, xs)]
    assert layers[0].in_features == 10 and layers[0].out_features == 12
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert (outs[1] - linear(x)).abs().max() > 1e-3  # the adapter contributes
    for out in outs:
        out.pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-4, rtol=1e-5)
    for a, b in zip(*(adapter_tensors(layer) for layer in layers)):
        assert a.grad is not None and a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-5)


def test_conv1d_shape_and_weight_view_are_out_by_in():
    conv, _ = conv_and_linear()
    assert weight_shape(conv) == (12, 10) and tuple(weight_OI(conv).shape) == (12, 10)
    conv.weight = nn.Parameter(torch.empty(0))  # a ZeRO-3 partitioned Conv1D weight
    conv.weight.ds_shape = torch.Size([10, 12])
    assert weight_shape(conv) == (12, 10)


def test_a_lora_merged_into_gpt2_conv1d_equals_the_adapted_model(tmp_path):
    model = tiny_model("gpt2")
    adapters = inject_adapters(model, AdapterConfig(method="lora", rank=4, dropout=0.0, target_modules=["all-linear"]))
    assert {type(layer.base_layer) for layer in adapters.layers.values()} == {Conv1D}
    randomize_adapters(adapters, std=0.2)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(tmp_path / "a", adapter_state(adapters), adapters.cfg, {"task_type": "causal_lm",
                                                                         "base_model": "tiny-gpt2"})
    base = tiny_model("gpt2")
    with torch.no_grad():
        before = base(input_ids=ids).logits
    src = AdapterSource(tmp_path / "a")
    assert sorted(merge_into(base, src, src.tensors())) == sorted(adapters.layers)
    with torch.no_grad():
        merged = base(input_ids=ids).logits
    assert (merged - before).abs().max() > 1e-2
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
