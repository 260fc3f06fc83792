"""The fast paths (dense-masked and grouped) against a plain per-expert loop written here:
outputs and gradients of x, A, B, gate and threshold, for every method, with capacity drops,
padding and the aux loss."""

import math

import pytest
import torch
import torch.nn as nn

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.moe.experts import GROUPED_PAIR_COST, choose_compute_path

D_IN, D_OUT, N, R = 12, 10, 6, 3


def make_layer(method, path="dense", **kw):
    torch.manual_seed(0)
    extra = {"gate_dropout": 0.0} if method == "sira" else {}
    cfg = AdapterConfig(method=method, num_experts=N, rank=R, alpha=8.0, dropout=0.0, compute_path=path,
                        **{**extra, **kw})
    layer = adapt_linear(nn.Linear(D_IN, D_OUT), cfg)
    bank = layer.experts if layer.router is not None else layer.lora
    with torch.no_grad():
        bank.lora_B.normal_(0, 0.3)
    return layer.train()


def reference_weights(layer, x_TD):
    """Routing weights, routed mask and kept mask from the equations, one token and expert at a time."""
    cfg, r = layer.cfg, layer.router
    p = torch.softmax(x_TD @ r.gate_weight.t(), dim=-1)
    T = x_TD.shape[0]
    if cfg.method == "adamole":
        tau = cfg.effective_tau_max * torch.sigmoid(x_TD @ r.threshold_weight.t() + r.threshold_bias).squeeze(-1)
        score = p - tau[:, None]
        routed = score >= 0
    elif cfg.method == "mole_threshold":
        score, routed = p, p >= cfg.effective_threshold
    else:
        score = p
        routed = torch.zeros_like(p, dtype=torch.bool)
        for t in range(T):
            routed[t, p[t].argsort(descending=True)[: cfg.top_k]] = True
    kept = routed.clone()
    cf = cfg.effective_capacity_factor
    if cf > 0:
        cap = math.ceil(cf * int(routed.sum()) / N)
        for e in range(N):
            tokens = [t for t in range(T) if routed[t, e]]
            if cfg.drop_policy == "probs":
                tokens = sorted(tokens, key=lambda t: (-p[t, e].item(), t))
            for t in tokens[cap:]:
                kept[t, e] = False
    weights = torch.zeros_like(p)
    for t in range(T):
        over = kept[t] if (cf > 0 and cfg.renormalize_after_drop) else routed[t]
        total = sum(score[t, e] for e in range(N) if over[e])
        for e in range(N):
            if kept[t, e] and total > 0:
                weights[t, e] = score[t, e] / total
    return weights, routed, kept, p


def reference_forward(layer, x):
    """base(x) + sum_i w_i * (alpha/r) * B_i A_i x, looping over experts."""
    x_TD = x.reshape(-1, D_IN)
    out = layer.base_layer(x_TD)
    if layer.router is None:
        A, B = layer.lora.lora_A[0], layer.lora.lora_B[0]
        return (out + (x_TD @ A.t()) @ B * layer.cfg.scaling).view(*x.shape[:-1], D_OUT)
    weights, _, _, _ = reference_weights(layer, x_TD)
    bank = layer.experts
    delta = torch.zeros_like(out)
    for e in range(N):
        expert_out = (x_TD @ bank.lora_A[e].t()) @ bank.lora_B[e] * layer.cfg.scaling  # B_e A_e x
        delta = delta + weights[:, e : e + 1] * expert_out
    return (out + delta).view(*x.shape[:-1], D_OUT)


def grads(layer, x, fn, seed=3):
    layer.zero_grad()
    if layer.router is not None:
        layer.experts.zero_grad()
    xx = x.detach().clone().requires_grad_(True)
    out = fn(xx)
    torch.manual_seed(seed)
    (out * torch.randn_like(out)).sum().backward()
    params = dict(layer.named_parameters())
    if layer.router is not None:
        params.update({f"experts.{n}": p for n, p in layer.experts.named_parameters()})
    g = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    g["x"] = xx.grad.clone()
    layer.context.take_aux_loss()
    return out.detach(), g


CASES = [
    ("lora", {}),
    ("mole_topk", {"top_k": 2}),
    ("mole_threshold", {}),
    ("sira", {"top_k": 2}),  # capacity_factor 1.0 by default: drops
    ("adamole", {}),
    ("adamole", {"tau_max": 0.1}),
    ("mole_topk", {"top_k": 3, "capacity_factor": 0.5, "drop_policy": "probs"}),
    ("mole_topk", {"top_k": 3, "capacity_factor": 0.5, "drop_policy": "position"}),
    ("mole_topk", {"top_k": 3, "capacity_factor": 0.5, "drop_policy": "probs", "renormalize_after_drop": True}),
    ("adamole", {"capacity_factor": 0.4, "drop_policy": "position", "renormalize_after_drop": True}),
]


@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("method, kw", CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for m, kw in CASES])
def test_fast_path_equals_per_expert_loop(method, kw, path):
    layer = make_layer(method, path, **kw)
    x = torch.randn(3, 7, D_IN)
    out, g = grads(layer, x, layer)
    ref_out, ref_g = grads(layer, x, lambda xx: reference_forward(layer, xx))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert set(g) == set(ref_g)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=f"grad of {name}")
    if layer.router is not None and layer.cfg.effective_capacity_factor > 0:
        _, routed, kept, _ = reference_weights(layer, x.reshape(-1, D_IN))
        assert (routed & ~kept).any(), "the capacity case should drop pairs"


def test_padding_tokens_get_zero_delta_and_no_statistics():
    layer = make_layer("adamole")
    x = torch.randn(2, 5, D_IN)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer.context.begin_forward(mask)
    out = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(out[0, 3:], base[0, 3:])  # padding: exactly the base output
    assert not torch.allclose(out[0, :3], base[0, :3])
    stats = layer.context.stats[layer.adapter_name]
    assert stats[0].item() == 8  # 8 real tokens counted
    # aux loss over real tokens only, by hand
    valid = mask.reshape(-1).bool()
    _, routed, _, p = reference_weights(layer, x.reshape(-1, D_IN))
    f = routed[valid].float().mean(0)
    P = p[valid].mean(0)
    assert layer.context.aux_losses[0].item() == pytest.approx((N * (f * P).sum()).item(), rel=1e-5)


def test_route_padding_reproduces_the_public_code():
    layer = make_layer("adamole", route_padding=True)
    x = torch.randn(1, 4, D_IN)
    layer.context.begin_forward(torch.tensor([[1, 1, 0, 0]]))
    out = layer(x)
    assert not torch.allclose(out[0, 2:], layer.base_layer(x)[0, 2:])  # padding routed too
    _, routed, _, p = reference_weights(layer, x.reshape(-1, D_IN))
    expected = N * (routed.float().mean(0) * p.mean(0)).sum()
    assert layer.context.aux_losses[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_path_rule():
    assert choose_compute_path(8, 4, 4.0) == "dense"  # the paper's shape
    assert choose_compute_path(64, 8, 1.0) == "grouped"  # 512 > 140
    assert choose_compute_path(64, 8, 4.0) == "dense"  # 560 >= 512
    assert GROUPED_PAIR_COST * 2 < 64 * 8 and choose_compute_path(64, 8, 2.0) == "grouped"


def test_auto_path_equals_both_paths_for_many_experts():
    torch.manual_seed(0)
    cfg = dict(method="mole_topk", num_experts=64, rank=4, top_k=1, dropout=0.0)
    x = torch.randn(40, 16)
    outs = []
    for path in ("auto", "dense", "grouped"):
        torch.manual_seed(0)
        layer = adapt_linear(nn.Linear(16, 16), AdapterConfig(compute_path=path, **cfg))
        with torch.no_grad():
            layer.experts.lora_B.normal_()
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["adamole", "mole_topk"])
def test_grouped_kernel_gradients_equal_dense(method):
    """Dimensions that are multiples of 16 bytes take torch._grouped_mm (others its loop fallback)."""
    layers = {}
    for path in ("dense", "grouped"):
        torch.manual_seed(0)
        layer = adapt_linear(nn.Linear(16, 8), AdapterConfig(method=method, num_experts=8, rank=4, dropout=0.0,
                                                               compute_path=path))
        with torch.no_grad():
            layer.experts.lora_B.normal_()
        layers[path] = layer.train()
    x = torch.randn(33, 16)
    (od, gd), (og, gg) = (grads(layers[p], x, layers[p]) for p in ("dense", "grouped"))
    torch.testing.assert_close(og, od, atol=1e-5, rtol=1e-4)
    for name in gd:
        torch.testing.assert_close(gg[name], gd[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_the_bank_adds_a_given_delta_as_it_writes_its_own(path):
    """ExpertBank(add_to=): the expert-parallel combine folded into the own share's matmul equals
    the bank's delta plus add_to, and add_to gets the output's gradient unchanged."""
    from adamole_dist.moe.experts import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(4, 3, 16, 12, 0.5)
    torch.nn.init.normal_(bank.lora_B, std=0.1)
    x = torch.randn(10, 16)
    w = torch.rand(10, 4)
    m = torch.rand(10, 4) > 0.4
    extra = torch.randn(10, 12, requires_grad=True)
    before = extra.detach().clone()
    fused = bank(x, w, m, path, add_to=extra)
    torch.testing.assert_close(fused, bank(x, w, m, path) + extra)
    g = torch.randn(10, 12)
    fused.backward(g)
    assert torch.equal(extra.grad, g)
    assert torch.equal(extra.detach(), before)  # add_to itself is left as it was


def test_the_combine_is_fused_only_where_the_rows_line_up_and_the_sum_is_fp32():
    from adamole_dist.parallel.ep_dispatcher import fused_combine

    assert fused_combine(True, torch.float32) and fused_combine(True, torch.float64)
    assert not fused_combine(False, torch.float32)  # rows in another order: index_add after
    assert not fused_combine(True, torch.bfloat16)  # bf16 experts: permute.combine sums in fp32
