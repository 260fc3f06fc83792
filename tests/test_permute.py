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
from adamole_dist.moe.permute import combine, pack, plan_dispatch, unpack


def simulate_exchange(plans_and_rows, me):
    """What rank ``me`` receives: rows destined to it from every rank, in rank order."""
    out = []
    for plan, rows in plans_and_rows:
        out.append(rows[plan.dest_S == me])
    return torch.cat(out)


def test_each_token_sent_once_per_destination():
    kept = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2)
    # destination 0 owns experts 0,1; destination 1 owns 2,3
    assert plan.send_counts_J.tolist() == [2, 2]
    assert plan.dest_S.tolist() == [0, 0, 1, 1]
    assert plan.token_S.tolist() == [0, 1, 1, 3]  # token 0 once although two experts on rank 0


def test_zero_tokens():
    kept = torch.zeros(0, 4, dtype=torch.bool)
    plan = plan_dispatch(kept, num_ranks=2)
    assert plan.send_counts_J.tolist() == [0, 0]
    rows = pack(torch.zeros(0, 3), torch.zeros(0, 4), kept, plan, 2)
    assert rows.shape == (0, 3 + 2 + 2)
    assert combine(torch.zeros(0, 5), plan, 0).shape == (0, 5)


def test_every_token_to_one_expert_and_round_trip():
    torch.manual_seed(0)
    T, D, N, J = 6, 3, 4, 2
    x = torch.randn(T, D)
    kept = torch.zeros(T, N, dtype=torch.bool)
    kept[:, 3] = True
    w = torch.rand(T, N) * kept
    plan = plan_dispatch(kept, J)
    assert plan.send_counts_J.tolist() == [0, T]
    rows = pack(x, w, kept, plan, J)
    x_R, w_R, m_R = unpack(rows, D, N // J)
    torch.testing.assert_close(x_R, x)
    torch.testing.assert_close(w_R, w[:, 2:4])
    assert m_R[:, 1].all() and not m_R[:, 0].any()
    # a stand-in expert computation on the receiver, returned and combined
    y = combine(x_R.sum(1, keepdim=True) * w_R[:, 1:2], plan, T)
    torch.testing.assert_close(y[:, 0], x.sum(1) * w[:, 3])


def test_one_rank_is_identity_permutation():
    torch.manual_seed(1)
    kept = torch.rand(5, 4) > 0.4
    kept[2] = False
    plan = plan_dispatch(kept, 1)
    assert plan.token_S.tolist() == [t for t in range(5) if kept[t].any()]
    x = torch.randn(5, 2)
    rows = pack(x, kept.float(), kept, plan, 1)
    torch.testing.assert_close(rows[:, :2], x[plan.token_S])


def test_two_rank_exchange_matches_local_sum():
    """Pack on two simulated ranks, exchange, compute per-rank experts, return, combine: equals
    computing every expert locally."""
    torch.manual_seed(2)
    T, D, N, J = 7, 4, 4, 2
    W = torch.randn(N, D)  # expert n maps x -> W[n] . x
    xs = [torch.randn(T, D), torch.randn(T, D)]
    kepts = [torch.rand(T, N) > 0.5, torch.rand(T, N) > 0.5]
    ws = [torch.rand(T, N) * k for k in kepts]
    plans = [plan_dispatch(k, J) for k in kepts]
    rows = [pack(x, w, k, p, J) for x, w, k, p in zip(xs, ws, kepts, plans)]
    results = {}
    for me in range(J):
        recv = simulate_exchange(list(zip(plans, rows)), me)
        x_R, w_R, m_R = unpack(recv, D, N // J)
        y_R = ((x_R @ W[me * 2:(me + 1) * 2].t()) * w_R * m_R).sum(1, keepdim=True)
        # split the results back to their senders, in sender order
        sizes = [int(p.send_counts_J[me]) for p in plans]
        for src, part in enumerate(torch.split(y_R, sizes)):
            results.setdefault(src, {})[me] = part
    for src in range(J):
        back = torch.cat([results[src][d] for d in range(J)])
        y = combine(back, plans[src], T)
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


def test_weights_cross_a_16_bit_wire_bit_for_bit_and_so_do_their_gradients():
    torch.manual_seed(3)
    T, D, N, J = 7, 5, 4, 2
    kept = torch.rand(T, N) > 0.4
    w = (torch.rand(T, N) * kept).requires_grad_()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(T, D).to(dtype)
        plan = plan_dispatch(kept, J)
        rows = pack(x, w, kept, plan, J)
        assert rows.dtype == dtype and rows.shape[1] == D + 2 * (N // J) + N // J  # two columns per fp32 weight
        halves = []
        for me in range(J):  # what each destination receives
            x_R, w_R, m_R = unpack(rows[plan.dest_S == me], D, N // J)
            sel = plan.token_S[plan.dest_S == me]
            assert w_R.dtype == torch.float32
            assert torch.equal(w_R, w.detach()[sel][:, me * 2:(me + 1) * 2])  # exact, not rounded to 16 bits
            halves.append((w_R * torch.arange(1.0, 3.0)).sum())
        w.grad = None
        sum(halves).backward()
        torch.testing.assert_close(w.grad, torch.arange(1.0, 3.0).repeat(2) * kept.any(1, keepdim=True).float()
                                   * (kept.view(T, J, 2).any(-1).repeat_interleave(2, dim=1)).float(), rtol=0, atol=0)
