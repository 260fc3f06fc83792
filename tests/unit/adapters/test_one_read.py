"""The router's and the experts' first matmul as one (AdaptedLinear.reads_x_once): where both read the same
x -- no dropout active, every expert on this rank on the dense path -- a routed layer multiplies x as often
as LoRA does (x, the biggest tensor, read once forward, its gradient written once backward), with the
outputs and gradients of the two-read path; elsewhere the experts read x themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import adapt_linear
from benchmarks.common.operators import ComputingOperators

D, T = 32, 20


def layer_of(method: str, **kw):
    torch.manual_seed(0)
    n, r = (1, 8) if method == "lora" else (4, 2)
    layer = adapt_linear(nn.Linear(D, D, bias=False).requires_grad_(False),
                         AdapterConfig(method=method, num_experts=n, rank=r, **kw)).train()
    if layer.router is not None:
        with torch.no_grad():
            layer.experts.lora_B.normal_(0, 0.3)
    return layer


def matmuls(layer, training: bool = True) -> int:
    """Matrix products of one forward and backward (the aux loss included)."""
    layer.train(training)
    x = torch.randn(T, D, requires_grad=True)
    with ComputingOperators() as ops:
        (layer(x).sum() + layer.context.take_aux_loss()).backward()
    return ops.counts["mm"] + ops.counts["addmm"] + ops.counts["linear"]


@pytest.mark.parametrize("method", ["adamole", "mole_topk", "mole_threshold"])
def test_without_dropout_a_routed_layer_multiplies_x_as_often_as_lora(method):
    lora = matmuls(layer_of("lora", dropout=0.0))
    # the base layer 2 (forward, x's gradient), the adapter 6 (forward 2, backward 4)
    assert matmuls(layer_of(method, dropout=0.0)) == lora == 8
    # with dropout the experts read the dropped x, the router x: a matmul each, forward and backward
    assert matmuls(layer_of(method, dropout=0.1)) == lora + 3
    assert matmuls(layer_of(method, dropout=0.0, compute_path="grouped")) > lora  # the grouped path gathers x


@pytest.mark.parametrize("method", ["adamole", "mole_topk"])
def test_one_read_gives_the_two_read_outputs_and_gradients(method):
    x0 = torch.randn(3, 7, D)
    results = []
    for once in (True, False):
        layer = layer_of(method, dropout=0.0)
        if not once:
            layer.reads_x_once = lambda x_TD: False
        assert layer.reads_x_once(x0.view(-1, D)) is once
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        (y.square().sum() + 3.0 * layer.context.take_aux_loss()).backward()
        grads = {"x": x.grad, "A": layer.experts.lora_A.grad, "B": layer.experts.lora_B.grad,
                 **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:  # fp32 noise at the tensor's scale: one wider matmul sums in another order
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6 * float(g2[name].abs().max()), msg=name)


def test_evaluation_reads_once_even_with_dropout_configured():
    layer = layer_of("adamole", dropout=0.1)
    x = torch.randn(T, D)
    assert not layer.train().reads_x_once(x) and layer.eval().reads_x_once(x)
