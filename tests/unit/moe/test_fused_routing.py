"""The fused routing node (moe/fused_routing.py) against the operator chain it replaces (routing.py,
balance.py, routing_stats.py, kept as the layer's unfused path): outputs, aux losses, routing
statistics and the gradients of x, the router and the experts, for every method it covers, with and
without padding, routed padding and both aux-loss variants; the edge cases of the equations; and the
count of computing operators of one adapted layer's forward and backward, pinned per method."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.moe.fused_routing import fused_rule
from benchmarks.common.operators import ComputingOperators

D, N, R, B, S = 16, 6, 3, 3, 7
CASES = [("adamole", "switch"), ("adamole", "reference"), ("mole_topk", "switch"), ("mole_threshold", "switch")]


def layer_pair(method: str, variant: str, **kw):
    """(fused layer, unfused layer) with the same weights."""
    layers = []
    for fused in (True, False):
        torch.manual_seed(0)
        cfg = AdapterConfig(method=method, num_experts=N, rank=R, dropout=0.0, aux_loss_variant=variant, **kw)
        layer = adapt_linear(nn.Linear(D, D), cfg).train()
        with torch.no_grad():
            layer.experts.lora_B.normal_(0, 0.3)
        if not fused:
            layer.fused_rules = None
        layers.append(layer)
    assert layers[0].fused_rules is not None
    return layers


def run(layer, x, mask, training=True):
    layer.train(training)
    x = x.clone().requires_grad_(True)
    layer.context.begin_forward(mask)
    y = layer(x)
    aux = layer.context.take_aux_loss()
    (y.square().sum() + 3.0 * aux).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
    grads.update(A=layer.experts.lora_A.grad, B=layer.experts.lora_B.grad)
    return y.detach(), aux.detach(), layer.context.pop_stats(), grads


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    return x, mask


@pytest.mark.parametrize("route_padding", [False, True], ids=["padding_out", "route_padding"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("method, variant", CASES)
def test_fused_routing_equals_the_operator_chain(method, variant, with_mask, route_padding):
    x, mask = inputs()
    fused, chain = layer_pair(method, variant, route_padding=route_padding, top_k=2)
    got, want = run(fused, x, mask if with_mask else None), run(chain, x, mask if with_mask else None)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    assert got[2].keys() == want[2].keys() == {"linear"}
    torch.testing.assert_close(got[2]["linear"], want[2]["linear"], rtol=1e-6, atol=1e-5)
    assert got[3].keys() == want[3].keys()
    for name in want[3]:  # fp32 noise at the tensor's scale: the fused layer reads x in one wider matmul
        scale = float(want[3][name].abs().max().clamp(min=1.0))
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("method, variant", CASES[:1] + CASES[2:])
def test_evaluation_mode_computes_no_aux_loss_and_the_same_outputs(method, variant):
    x, mask = inputs(2)
    fused, chain = layer_pair(method, variant)
    with torch.no_grad():
        for layer in (fused, chain):
            layer.eval()
            layer.context.begin_forward(mask)
        y_fused, y_chain = fused(x), chain(x)
    torch.testing.assert_close(y_fused, y_chain, rtol=1e-5, atol=1e-6)
    assert fused.context.aux_sum_and_terms() is None and chain.context.aux_sum_and_terms() is None
    torch.testing.assert_close(fused.context.pop_stats()["linear"], chain.context.pop_stats()["linear"])


def test_edge_cases_tau_equal_to_a_probability_and_nothing_selected():
    """tau = p_i exactly selects expert i with weight 0 (and its gradient is the chain's); tau above every
    probability selects nothing: zero weights, zero delta, counted as a token with no expert."""
    for tau_max, bias in ((1.0, 0.0), (1.0, 50.0)):
        fused, chain = layer_pair("adamole", "switch", tau_max=tau_max)
        for layer in (fused, chain):
            with torch.no_grad():
                layer.router.gate_weight.zero_()  # p = 1/N for every expert
                layer.router.threshold_weight.zero_()
                layer.router.threshold_bias.fill_(bias)  # sigmoid(0) = 1/2: tau = 1/2 > 1/N; 50: tau = 1
        x, mask = inputs(3)
        got, want = run(fused, x, mask), run(chain, x, mask)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[2]["linear"], want[2]["linear"])
        for name in want[3]:
            torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-6, msg=name)
        assert got[2]["linear"][3] == int(mask.sum())  # every real token: no expert fired
    fused, chain = layer_pair("adamole", "switch", tau_max=1.0 / N)
    for layer in (fused, chain):
        with torch.no_grad():
            layer.router.gate_weight.zero_()
            layer.router.threshold_weight.zero_()
            layer.router.threshold_bias.fill_(40.0)  # tau = 1/N = p_i: every expert selected, weight 0
    got, want = run(fused, *inputs(4)), run(chain, *inputs(4))
    torch.testing.assert_close(got[0], want[0])
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_router_input_stays_non_finite():
    fused, _ = layer_pair("adamole", "switch")
    x, mask = inputs(5)
    x[1, 2, 0] = float("nan")
    fused.context.begin_forward(mask)
    y = fused(x)
    assert not torch.isfinite(y[1, 2]).all() and torch.isfinite(y[0]).all()


def test_the_fused_node_covers_exactly_what_it_computes():
    covered = AdapterConfig(method="adamole", num_experts=4, rank=2)
    assert fused_rule(covered) is not None
    for kw in ({"method": "sira"}, {"capacity_factor": 1.0}, {"balance_bias_rate": 0.01}):
        assert fused_rule(AdapterConfig(**{"num_experts": 4, "rank": 2, **kw})) is None, kw
    assert fused_rule(AdapterConfig(method="adamole", num_experts=4, rank=2, aux_loss_coeff=0.0))[True].with_aux \
        is False


# -- computing operators --------------------------------------------------------------------------------------
def operators_per_step(method: str, **kw) -> int:
    """One adapted layer (d 256, 256 tokens, default dropout unless ``kw`` says) forward and backward with its
    aux loss, in training, the statistics buffer already there (the trainer reads it only when it logs)."""
    torch.manual_seed(0)
    cfg = AdapterConfig(method=method, num_experts=8, rank=32 if method == "lora" else 4, **kw)
    layer = adapt_linear(nn.Linear(256, 256, bias=False).requires_grad_(False), cfg).train()
    x = torch.randn(256, 256, requires_grad=True)
    for _ in range(2):  # the second step is counted: the buffers and gradients exist by then
        with ComputingOperators() as ops:
            loss = layer(x).sum()
            for aux in layer.context.aux_losses:  # lora has none
                loss = loss + aux
            loss.backward()
        layer.context.take_aux_loss()
    return ops.total


# Measured when the fused node landed (main before it: lora 24, adamole 111, mole_topk 96); a change that
# adds operators to a routed layer's step fails here and has to say why. adamole is 2.54 x lora (issue 36 asks
# for at most 2.5 x; earlier counts added one operator of the test's own, Python's sum() of the aux losses
# starting from 0, to every method, which put the ratio at 62 / 25 = 2.48).
PINNED = {"lora": 24, "adamole": 61, "mole_topk": 52, "mole_threshold": 50}


def test_the_operators_of_one_adapted_layer_do_not_grow():
    counts = {method: operators_per_step(method) for method in PINNED}
    assert counts == PINNED
