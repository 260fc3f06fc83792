"""Permute / unpermute / dedup of expert-parallel dispatch as pure functions (no process group),
and the group-capacity helpers against the single-process capacity rule."""

import torch

from adamole_dist.moe.capacity import (
    apply_capacity,
    expert_capacity,
    keep_by_cutoff,
    keep_within_quota,
    position_quota,
    probs_candidates,
    probs_cutoff,
)
from adamole_dist.moe.permute import (
    combine,
    gather_rows,
    local_columns,
    plan_dispatch,
    routing_columns,
    split_routing_columns,
)


def simulate_exchange(plans_and_rows, me):
    """What rank ``me`` receives: rows destined to it from every rank, in rank order."""
    return torch.cat([rows[plan.dest_S == me] for plan, rows in plans_and_rows])


def test_each_token_sent_once_per_destination():
    kept = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2)
    # destination 0 owns experts 0,1; destination 1 owns 2,3
    assert plan.send_counts_J.tolist() == [2, 2]
    assert plan.dest_S.tolist() == [0, 0, 1, 1]
    assert plan.token_S.tolist() == [0, 1, 1, 3]  # token 0 once although two experts on rank 0


def test_the_senders_own_experts_get_no_rows():
    kept = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2, my_rank=0)
    assert plan.send_counts_J.tolist() == [0, 2]
    assert plan.token_S.tolist() == [1, 3] and plan.dest_S.tolist() == [1, 1]
    assert not plan.sends_every_token_once(plan.send_counts_J.tolist())


def test_every_token_once_in_order_sends_x_itself_and_sums_without_scatter():
    torch.manual_seed(0)
    T, D, N = 5, 3, 4
    kept = torch.ones(T, N, dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2, my_rank=1)
    assert plan.sends_every_token_once(plan.send_counts_J.tolist())
    x = torch.randn(T, D)
    assert gather_rows(x, plan, True) is x  # no copy
    local, back = torch.randn(T, 2), torch.randn(T, 2)
    torch.testing.assert_close(combine(local, back, plan, True), local + back)
    torch.testing.assert_close(combine(local, back, plan, False), local + back)  # the general path agrees


def test_zero_tokens():
    kept = torch.zeros(0, 4, dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2, my_rank=0)
    assert plan.send_counts_J.tolist() == [0, 0]
    assert not plan.sends_every_token_once([0, 0])
    assert gather_rows(torch.zeros(0, 3), plan, False).shape == (0, 3)
    assert routing_columns(torch.zeros(0, 4), kept, plan, 2).shape == (0, 2)
    assert combine(torch.zeros(0, 5), torch.zeros(0, 5), plan, False).shape == (0, 5)


def test_routing_columns_carry_exact_fp32_weights_and_kept_bits_and_their_gradients():
    torch.manual_seed(1)
    T, N, J = 6, 4, 2
    kept = torch.rand(T, N) > 0.4
    kept[0, 0] = True
    w = (torch.rand(T, N) * kept).detach()
    w[0, 0] = 0.0  # a kept pair may weigh exactly 0 (adamole: p == tau); it must stay kept
    w.requires_grad_()
    plan = plan_dispatch(kept, J)
    cols = routing_columns(w, kept, plan, J)
    assert cols.dtype == torch.float32 and cols.shape == (int(plan.send_counts_J.sum()), N // J)
    w_S, kept_S = split_routing_columns(cols)
    for s, (t, j) in enumerate(zip(plan.token_S.tolist(), plan.dest_S.tolist())):
        assert torch.equal(w_S[s], w.detach()[t, 2 * j:2 * j + 2])
        assert torch.equal(kept_S[s], kept[t, 2 * j:2 * j + 2])
    w_S.sum().backward()
    sent = torch.zeros(T, N)
    for t, j in zip(plan.token_S.tolist(), plan.dest_S.tolist()):
        sent[t, 2 * j:2 * j + 2] = 1.0
    assert torch.equal(w.grad, sent * kept)  # only kept pairs weigh anything


def test_two_rank_exchange_matches_local_sum():
    """Each of two simulated ranks computes its own experts in place, sends the other's rows with their
    routing columns, the receiver computes, returns, and the sender combines: equals computing every
    expert locally."""
    torch.manual_seed(2)
    T, D, N, J = 7, 4, 4, 2
    L = N // J
    W = torch.randn(N, D)  # expert n maps x -> W[n] . x
    xs = [torch.randn(T, D), torch.randn(T, D)]
    kepts = [torch.rand(T, N) > 0.5, torch.rand(T, N) > 0.5]
    ws = [torch.rand(T, N) * k for k in kepts]
    plans = [plan_dispatch(k, J, my_rank) for my_rank, k in enumerate(kepts)]
    rows = [gather_rows(x, p, False) for x, p in zip(xs, plans)]
    cols = [routing_columns(w, k, p, J) for w, k, p in zip(ws, kepts, plans)]

    def experts(me, x, w, m):
        return ((x @ W[me * L:(me + 1) * L].t()) * w * m).sum(1, keepdim=True)

    results = {}
    for me in range(J):
        x_R = simulate_exchange(list(zip(plans, rows)), me)
        w_R, m_R = split_routing_columns(simulate_exchange(list(zip(plans, cols)), me))
        y_R = experts(me, x_R, w_R, m_R)
        sizes = [int(p.send_counts_J[me]) for p in plans]  # split back to their senders, in sender order
        for src, part in enumerate(torch.split(y_R, sizes)):
            results.setdefault(src, {})[me] = part
    for src in range(J):
        back = torch.cat([results[src][d] for d in range(J)])
        local = experts(src, xs[src], local_columns(ws[src], src, L), local_columns(kepts[src], src, L))
        y = combine(local, back, plans[src], False)
        expected = ((xs[src] @ W.t()) * ws[src]).sum(1, keepdim=True)
        torch.testing.assert_close(y, expected)


def group_keep(masks, probs, cf, policy):
    """The expert-parallel capacity decision, computed rank by rank without a process group."""
    N = masks[0].shape[1]
    counts = torch.stack([m.sum(0) for m in masks])
    capacity = expert_capacity(int(counts.sum()), N, cf)
    if policy == "position":
        return [keep_within_quota(m, position_quota(counts, r, capacity)) for r, m in enumerate(masks)]
    stride = max(m.shape[0] for m in masks) + 1
    cands = [probs_candidates(m, p, capacity) for m, p in zip(masks, probs)]
    vals = torch.stack([c[0] for c in cands])
    pos = torch.stack([c[1] for c in cands])
    p_N, g_N = probs_cutoff(vals, pos, capacity, stride)
    return [keep_by_cutoff(m, p, p_N, g_N, r, stride) for r, (m, p) in enumerate(zip(masks, probs))]


def test_group_capacity_equals_single_process_capacity():
    torch.manual_seed(3)
    for policy in ("position", "probs"):
        for cf in (0.3, 0.7, 1.0, 2.0):
            sizes = [9, 5, 7]
            probs = [torch.rand(t, 6).softmax(-1) for t in sizes]
            probs[1][2] = probs[0][4]  # an exact tie across ranks
            masks = [p > 0.15 for p in probs]
            masks[1][2] = masks[0][4]
            single = apply_capacity(torch.cat(masks), torch.cat(probs),
                                    expert_capacity(int(torch.cat(masks).sum()), 6, cf), policy)
            grouped = torch.cat(group_keep(masks, probs, cf, policy))
            assert torch.equal(grouped, single), (policy, cf)


def test_capacity_zero_keeps_nothing():
    """Nothing routed in the group: capacity 0, and the cut-off keeps no pair (no empty-index crash)."""
    mask = torch.zeros(5, 4, dtype=torch.bool)
    probs = torch.rand(5, 4)
    assert expert_capacity(0, 4, 1.0) == 0
    vals, pos = probs_candidates(mask, probs, 0)
    assert vals.shape == (0, 4)
    p_N, g_N = probs_cutoff(vals.unsqueeze(0).expand(2, -1, -1), pos.unsqueeze(0).expand(2, -1, -1), 0, stride=6)
    assert torch.isinf(p_N).all() and (p_N > 0).all()
    assert not keep_by_cutoff(torch.ones(5, 4, dtype=torch.bool), probs, p_N, g_N, 0, 6).any()
    for policy in ("probs", "position"):
        assert not apply_capacity(mask, probs, 0, policy).any()
