"""Routers against the equations of DESIGN.md §1, written out independently here; capacity and
load-balancing helpers on hand-built cases."""

import math

import pytest
import torch

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.moe.balance import load_balancing_loss
from adamole_dist.moe.capacity import apply_capacity, expert_capacity, keep_by_position, keep_by_probs
from adamole_dist.moe.routing import adamole_select, build_router, renormalize
from adamole_dist.moe.routing_stats import routing_stats, summarize_stats

N, D = 8, 16


def router(method, **kw):
    torch.manual_seed(0)
    return build_router(AdapterConfig(method=method, num_experts=N, **kw), D)


def test_adamole_router_matches_equations():
    r = router("adamole")
    x = torch.randn(64, D)
    out = r.route(x)
    p = torch.softmax(x @ r.gate_weight.t(), dim=-1)
    tau = (1 / N) * torch.sigmoid(x @ r.threshold_weight.t() + r.threshold_bias).squeeze(-1)
    a = p - tau[:, None]
    mask = a >= 0
    expected = torch.zeros_like(p)
    for t in range(64):  # w_i = a_i / sum_{j in S} a_j
        s = a[t][mask[t]].sum()
        if s > 0:
            expected[t][mask[t]] = a[t][mask[t]] / s
    torch.testing.assert_close(out.probs_TN, p)
    torch.testing.assert_close(out.tau_T, tau)
    assert torch.equal(out.mask_TN, mask)
    torch.testing.assert_close(out.weights_TN, expected)
    torch.testing.assert_close(out.weights_TN.sum(-1), torch.ones(64))


def test_tau_equal_to_a_probability_selects_it_with_weight_zero():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], requires_grad=True)
    tau = torch.tensor([0.3, 0.5], requires_grad=True)
    scores, mask = adamole_select(probs, tau)
    w = renormalize(scores, mask)
    assert mask[0].tolist() == [True, True, False]  # p_1 = tau: selected
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0, 0.0]))
    assert mask[1].tolist() == [True, False, False]  # the only selected expert has a = 0
    assert w[1].tolist() == [0.0, 0.0, 0.0]  # sum is 0 -> zero delta
    (w * torch.randn(2, 3)).sum().backward()
    assert torch.isfinite(probs.grad).all() and torch.isfinite(tau.grad).all()


def test_exactly_one_expert_selected_gets_weight_one():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    w = renormalize(*adamole_select(probs, torch.tensor([0.3])))
    assert w.tolist() == [[1.0, 0.0, 0.0]]


def test_nothing_selected_when_tau_max_exceeds_every_probability():
    torch.manual_seed(0)
    layer = adapt_linear(torch.nn.Linear(D, D),
                         AdapterConfig(method="adamole", num_experts=N, tau_max=1.0, dropout=0.0))
    torch.nn.init.normal_(layer.experts.lora_B)
    with torch.no_grad():
        layer.router.threshold_bias.fill_(20.0)  # tau -> 1 > every p_i
    x = torch.randn(32, D)
    r = layer.router.route(x)
    assert not r.mask_TN.any() and r.weights_TN.abs().sum() == 0
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_tau_max_at_most_one_over_n_always_selects_an_expert():
    for tau_max in (1 / N, 1 / (2 * N)):
        r = router("adamole", tau_max=tau_max)
        with torch.no_grad():
            r.threshold_bias.fill_(50.0)  # push tau to its maximum
        for seed in range(20):
            torch.manual_seed(seed)
            out = r.route(torch.randn(128, D) * 5)
            assert out.mask_TN.any(-1).all()  # max p >= 1/N >= tau_max >= tau


def test_threshold_parameters_get_gradient():
    r = router("adamole")
    out = r.route(torch.randn(64, D))
    (out.weights_TN * torch.randn(64, N)).sum().backward()
    assert r.threshold_weight.grad.abs().sum() > 0 and r.threshold_bias.grad.abs() > 0
    assert r.gate_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_selects_the_k_largest_and_renormalises(k):
    r = router("mole_topk", top_k=k)
    x = torch.randn(50, D)
    out = r.route(x)
    p = torch.softmax(x @ r.gate_weight.t(), -1)
    assert (out.mask_TN.sum(-1) == k).all()
    for t in range(50):
        top = set(p[t].argsort(descending=True)[:k].tolist())
        assert set(out.mask_TN[t].nonzero().flatten().tolist()) == top
        idx = sorted(top)
        torch.testing.assert_close(out.weights_TN[t, idx], p[t, idx] / p[t, idx].sum())


def test_fixed_threshold_router():
    r = router("mole_threshold", threshold=0.13)
    x = torch.randn(200, D) * 3
    x[::2] *= 0.001  # near-uniform probabilities, all just under 0.13: nothing selected
    out = r.route(x)
    p = torch.softmax(x @ r.gate_weight.t(), -1)
    assert torch.equal(out.mask_TN, p >= 0.13)
    none = ~out.mask_TN.any(-1)
    assert none.any(), "test input should contain tokens with no expert above the threshold"
    assert out.weights_TN[none].abs().sum() == 0
    some = ~none
    torch.testing.assert_close(out.weights_TN[some].sum(-1), torch.ones(int(some.sum())))


def test_sira_gate_dropout_only_in_training():
    r = router("sira", top_k=2, gate_dropout=0.3)
    topk = router("mole_topk", top_k=2)
    x = torch.randn(256, D)
    r.eval()
    torch.testing.assert_close(r.route(x).weights_TN, topk.route(x).weights_TN)
    r.train()
    torch.manual_seed(1)
    assert not torch.equal(r.route(x).mask_TN, topk.route(x).mask_TN)
    no_drop = router("sira", top_k=2, gate_dropout=0.0).train()
    torch.testing.assert_close(no_drop.route(x).weights_TN, topk.route(x).weights_TN)


# -- capacity ----------------------------------------------------------------------------------
def test_expert_capacity_formula():
    assert expert_capacity(100, 8, 1.0) == math.ceil(100 / 8)
    assert expert_capacity(100, 8, 1.25) == math.ceil(1.25 * 100 / 8)
    assert expert_capacity(100, 8, 0) is None


def test_keep_by_position_and_probs():
    torch.manual_seed(0)
    mask = torch.rand(30, 4) > 0.3
    probs = torch.rand(30, 4)
    probs[5, 0] = probs[9, 0] = 0.99  # a tie: the earlier token wins
    mask[5, 0] = mask[9, 0] = True
    for cap in (1, 3, 100):
        pos = keep_by_position(mask, cap)
        pr = keep_by_probs(mask, probs, cap)
        for e in range(4):
            tokens = mask[:, e].nonzero().flatten().tolist()
            assert pos[:, e].nonzero().flatten().tolist() == tokens[:cap]
            ranked = sorted(tokens, key=lambda t: (-probs[t, e].item(), t))[:cap]
            assert sorted(pr[:, e].nonzero().flatten().tolist()) == sorted(ranked)
        assert not (pos & ~mask).any() and not (pr & ~mask).any()
    one = keep_by_probs(mask, probs, 1)
    assert one[5, 0] and not one[9, 0]
    assert apply_capacity(mask, probs, None, "probs") is mask


# -- load balancing --------------------------------------------------------------------------------
def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    count = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is padding
    loss = load_balancing_loss(probs, mask, count)
    f = torch.tensor([1 / 3, 2 / 3, 2 / 3])
    P = torch.tensor([0.9, 0.9, 1.2]) / 3
    assert loss.item() == pytest.approx(3 * (f * P).sum().item())
    loss.backward()
    torch.testing.assert_close(probs.grad[:3], (3 * f / 3).expand(3, 3))  # dL/dp = N f_i / n, f detached
    assert probs.grad[3].abs().sum() == 0
    tau = torch.tensor([0.1, 0.2, 0.0, 0.5])
    ref = load_balancing_loss(probs.detach(), mask, count, "reference", tau)
    P_ref = torch.tensor([0.6 - 0.1 + 0.2 - 0.2 + 0.1, 0.3 - 0.1 + 0.5 - 0.2 + 0.1, 0.1 - 0.1 + 0.3 - 0.2 + 0.8]) / 3
    assert ref.item() == pytest.approx(3 * (f * P_ref).sum().item())


def test_uniform_routing_gives_k():
    T, n, k = 40, 4, 2
    probs = torch.full((T, n), 1 / n)
    mask = torch.zeros(T, n, dtype=torch.bool)
    for t in range(T):
        mask[t, [t % n, (t + 1) % n]] = True
    assert load_balancing_loss(probs, mask, torch.ones(T)).item() == pytest.approx(k)


def test_routing_statistics_summary():
    kept = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    routed = kept.clone()
    routed[1, 2] = True  # one pair dropped by capacity
    weights = kept.float() / kept.float().sum(-1, keepdim=True).clamp(min=1)
    valid = torch.tensor([True, True, True, False])
    tau = torch.tensor([0.1, 0.2, 0.3, 0.9])
    s = summarize_stats(routing_stats(kept, routed, weights, valid, tau), has_tau=True)
    assert s["tokens"] == 3
    assert s["mean_active_experts"] == pytest.approx(4 / 3)
    assert s["mean_tau"] == pytest.approx(0.2)
    assert s["no_active_fraction"] == pytest.approx(1 / 3)
    assert s["dropped_pairs"] == 1 and s["dropped_fraction"] == pytest.approx(1 / 5)
    assert s["expert_load"] == pytest.approx([0.5, 0.25, 0.25])


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0, 1 / 3])
def test_capacity_on_the_device_equals_the_host_rule(cf):
    """The local dispatcher's capacity stays a tensor (no host sync) and keeps the same pairs."""
    from adamole_dist.moe.capacity import expert_capacity_on_device
    from adamole_dist.parallel.local_dispatcher import LocalDispatcher

    g = torch.Generator().manual_seed(int(cf * 100))
    for T in (1, 7, 40, 97):
        mask = torch.rand(T, 8, generator=g) < 0.4
        probs = torch.rand(T, 8, generator=g).softmax(-1)
        on_device = expert_capacity_on_device(mask, cf)
        assert on_device.dim() == 0 and int(on_device) == expert_capacity(int(mask.sum()), 8, cf)
        for policy in ("probs", "position"):
            expected = apply_capacity(mask, probs, expert_capacity(int(mask.sum()), 8, cf), policy)
            assert torch.equal(LocalDispatcher().capacity_keep(mask, probs, cf, policy), expected)
