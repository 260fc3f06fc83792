"""Expert parallelism on real gloo processes (world 2, ep_size 2) against one process.

* equivalence: one global batch through 2 EP ranks and through one process gives the same
  outputs, losses and parameters after 3 optimizer steps (fp32, tol 1e-5), for adamole and
  mole_topk, with and without capacity drops (aux loss with global scope included);
* a checkpoint and an adapter written at ep_size 2 load at ep_size 1 with identical outputs;
* ranks that receive no tokens (or have none) do not hang;
* bf16 activations with fp32 experts (DeepSpeed's bf16 set-up): the EP forward equals the local one;
* a bf16 wire (``--dispatch_dtype bf16``): half the bytes, results within bf16 rounding (tolerances below).

The trainer-level equivalence (DeepSpeed engine, world 4, clipping, accumulation) is in
test_trainer_equivalence.py.
"""

from pathlib import Path

import pytest
import torch

from adamole_dist import AdapterConfig
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.parallel.local_dispatcher import LocalDispatcher
from adamole_dist.train.expert_optimizer import ExpertOptimizer
from tests.helpers.mp_harness import run_ranks

pytestmark = pytest.mark.slow

N, RANK, SEQ, PER_RANK, STEPS, LR = 4, 2, 10, 3, 3, 1e-2
CASES = {
    "adamole": dict(method="adamole"),
    "adamole_drop_probs": dict(method="adamole", capacity_factor=0.5, drop_policy="probs"),
    "topk": dict(method="mole_topk", top_k=2),
    "topk_drop_position": dict(method="mole_topk", top_k=2, capacity_factor=0.6, drop_policy="position",
                               renormalize_after_drop=True),
}


WIRE_CASES = ["adamole", "topk"]  # also run with --dispatch_dtype bf16 (a compressed wire)
# Measured (pytest -s), bf16 wire against fp32 in one process, first step: adamole logits 3.7e-3 / 1.5e-3 apart,
# loss 1.5e-4, gradients 1.1e-2 / 1.2e-2 (norm-wise relative; the routers' gradients are sums that cancel, of
# terms made from the bf16 returned deltas). In topk the rounding of layer 0's delta moves a token of layer 1
# across the top-2 boundary (logits up to 0.17 apart) -- a discrete flip, not noise -- and the mean loss moves
# by up to 6e-3. Bytes: 0.540 of the fp32 minimum at D = O = 32 (the L = 2 fp32 routing columns weigh 2/64 of a
# row's values here; at D = O = 2048 with L = 4 they weigh 0.1 %).
WIRE_SMOOTH = ["adamole"]  # no routing flip on this batch: elementwise tolerances apply
WIRE_TOL_LOGITS, WIRE_TOL_GRADS, WIRE_TOL_LOSS, WIRE_TOL_LOSS_FLIPPED = 1e-2, 5e-2, 2e-3, 2e-2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def build(case: str, layout=None, wire=None, **extra):
    cfg = AdapterConfig(num_experts=N, rank=RANK, dropout=0.0, aux_loss_coeff=1e-2, aux_loss_scope="global",
                        **{**CASES[case], **extra})
    model = tiny_llama()
    if layout is None:
        adapters = inject_adapters(model, cfg, dispatcher=LocalDispatcher())
    else:
        from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher

        adapters = inject_adapters(model, cfg, dispatcher=ExpertParallelDispatcher(layout, wire),
                                   expert_slice=layout.expert_slice(N))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bank in adapters.expert_banks.values():  # B from the full bank, then this rank's slice
            full = torch.randn((N,) + tuple(bank.lora_B.shape[1:]), generator=g) * 0.2
            bank.lora_B.copy_(full[bank.first_expert:bank.first_expert + bank.num_experts])
    return model, adapters


def global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2 * PER_RANK, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[5, 4:] = 0
    return ids, mask


def task_loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def optimizers(model, adapters, world, edp_group=None):
    router_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    expert_opt = ExpertOptimizer(adapters.expert_parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                 max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=world, edp_group=edp_group)
    return router_opt, expert_opt


def snapshot(model, adapters, grads=False):
    """Trainable parameters by name and global expert id (or their gradients)."""
    of = (lambda p: p.grad.detach().clone()) if grads else (lambda p: p.detach().clone())  # noqa: E731
    state = {n: of(p) for n, p in model.named_parameters() if p.requires_grad}
    for name, bank in adapters.expert_banks.items():
        for i, gid in enumerate(bank.expert_ids):
            state[f"{name}.e{gid}.A"] = (bank.lora_A.grad if grads else bank.lora_A)[i].detach().clone()
            state[f"{name}.e{gid}.B"] = (bank.lora_B.grad if grads else bank.lora_B)[i].detach().clone()
    return state


def ep_worker(rank, world, out):
    import torch.distributed as dist

    from adamole_dist.parallel.collectives import all_reduce_sum
    from adamole_dist.parallel.layout import build_layout

    ids, mask = global_batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    runs = [(case, None) for case in CASES] + [(case, torch.bfloat16) for case in WIRE_CASES]
    for case, wire in runs:
        layout = build_layout(2, N)
        model, adapters = build(case, layout, wire)
        adapters.context.balance_over_data_parallel(all_reduce_sum, world)
        model.train()
        router_opt, expert_opt = optimizers(model, adapters, world, layout.edp_group)
        losses, first_logits = [], None
        for _ in range(STEPS):
            logits = model(input_ids=ids[mine], attention_mask=mask[mine]).logits
            first_logits = logits.detach().clone() if first_logits is None else first_logits
            loss = task_loss(logits, ids[mine], mask[mine])
            total = loss + adapters.cfg.aux_loss_coeff * adapters.aux_loss()
            total.backward()
            for p in router_opt.param_groups[0]["params"]:  # data-parallel average, as DeepSpeed does
                dist.all_reduce(p.grad)
                p.grad /= world
            if not losses:
                first_grads = snapshot(model, adapters, grads=True)
            router_opt.step()
            router_opt.zero_grad()
            expert_opt.step()
            losses.append(loss.item())
        counters = next(iter(adapters.layers.values())).dispatcher.counters
        results[case if wire is None else f"{case}@bf16"] = {
            "logits": first_logits, "losses": losses, "params": snapshot(model, adapters), "grads": first_grads,
            "expert_ids": [list(b.expert_ids) for b in adapters.expert_banks.values()],
            "bytes_sent": counters.bytes_sent, "bytes_min": counters.bytes_min}
    torch.save(results, Path(out) / f"ep_rank{rank}.pt")


def single_process(case):
    ids, mask = global_batch()
    model, adapters = build(case)
    model.train()
    router_opt, expert_opt = optimizers(model, adapters, 1)
    losses, first_logits = [], None
    for _ in range(STEPS):
        logits = model(input_ids=ids, attention_mask=mask).logits
        first_logits = logits.detach().clone() if first_logits is None else first_logits
        halves = [task_loss(logits[r * PER_RANK:(r + 1) * PER_RANK], ids[r * PER_RANK:(r + 1) * PER_RANK],
                            mask[r * PER_RANK:(r + 1) * PER_RANK]) for r in range(2)]
        loss = sum(halves) / 2
        (loss + adapters.cfg.aux_loss_coeff * adapters.aux_loss()).backward()
        if not losses:
            first_grads = snapshot(model, adapters, grads=True)
        router_opt.step()
        router_opt.zero_grad()
        expert_opt.step()
        losses.append([h.item() for h in halves])
    stats = {k: v.clone() for k, v in adapters.context.stats.items()}
    return first_logits, losses, snapshot(model, adapters), stats, first_grads


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    run_ranks(ep_worker, 2, str(out))
    return [torch.load(out / f"ep_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_ep2_equals_single_process(ep_results, case):
    logits, losses, params, stats, _ = single_process(case)
    if "drop" in case:
        dropped = sum(s[4].item() for s in stats.values())
        assert dropped > 0, "the capacity case must actually drop pairs"
    for rank, res in enumerate(ep_results):
        r = res[case]
        torch.testing.assert_close(r["logits"], logits[rank * PER_RANK:(rank + 1) * PER_RANK], atol=1e-5, rtol=1e-5)
        for step in range(STEPS):
            assert r["losses"][step] == pytest.approx(losses[step][rank], abs=1e-5)
        assert all(ids == [2 * rank, 2 * rank + 1] for ids in r["expert_ids"])
        for name, value in r["params"].items():
            torch.testing.assert_close(value, params[name], atol=1e-5, rtol=1e-5, msg=f"{case} {name}")
        # the measured agreement, for reports (pytest -s)
        print(f"{case} rank {rank}: max |diff| logits "
              f"{(r['logits'] - logits[rank * PER_RANK:(rank + 1) * PER_RANK]).abs().max().item():.2e}, losses "
              f"{max(abs(r['losses'][s] - losses[s][rank]) for s in range(STEPS)):.2e}, params after {STEPS} steps "
              f"{max((v - params[n]).abs().max().item() for n, v in r['params'].items()):.2e}")


@pytest.mark.parametrize("case", WIRE_CASES)
def test_bf16_wire_halves_the_bytes_and_stays_within_bf16_rounding(ep_results, case):
    """--dispatch_dtype bf16: rows and returned deltas travel in bf16 both ways (the routing weights
    bit for bit), so the bytes are about half the fp32 minimum; the first step's outputs, losses and
    gradients stay within bf16 rounding of the fp32 single-process run. (Where the rounding moves a
    downstream router across a threshold or top-k boundary the outputs jump: compare with care.)"""
    logits, losses, _, _, grads = single_process(case)
    for rank, res in enumerate(ep_results):
        r = res[f"{case}@bf16"]
        ratio = r["bytes_sent"] / r["bytes_min"]
        assert 0.45 <= ratio <= 0.5 + 1.5 * 2 / (32 + 32), ratio  # + L fp32 routing columns per D + O = 64 values
        mine = logits[rank * PER_RANK:(rank + 1) * PER_RANK]
        d_logits = (r["logits"] - mine).abs().max().item()
        d_loss = abs(r["losses"][0] - losses[0][rank])
        # an owner's expert gradients sum both ranks' tokens (the expert optimizer divides by the world)
        mine_grads = {n: g / 2 if n.endswith((".A", ".B")) else g for n, g in r["grads"].items() if n in grads}
        # norm-wise over every gradient this rank holds (a tensor with cancelling, tiny gradients -- a
        # threshold bias -- can be off by more relative to itself: its terms use the bf16 returned deltas)
        d_grads = (torch.cat([(g - grads[n]).flatten() for n, g in mine_grads.items()]).norm()
                   / torch.cat([grads[n].flatten() for n in mine_grads]).norm()).item()
        print(f"{case} bf16 wire rank {rank}: bytes/fp32 minimum {ratio:.3f}, max |diff| logits {d_logits:.1e}, "
              f"first loss {d_loss:.1e}, first gradients (relative, norm-wise) {d_grads:.1e}")
        assert d_logits > 0  # it did round
        if case in WIRE_SMOOTH:
            assert d_logits <= WIRE_TOL_LOGITS and d_grads <= WIRE_TOL_GRADS and d_loss <= WIRE_TOL_LOSS
        else:  # a flipped routing decision moves one token's output; the mean loss moves by a fraction of it
            assert d_loss <= WIRE_TOL_LOSS_FLIPPED


def test_experts_differ_across_ranks(ep_results):
    a, b = ep_results[0]["adamole"]["params"], ep_results[1]["adamole"]["params"]
    assert not set(k for k in a if ".e" in k) & set(k for k in b if ".e" in k)


# -- checkpoints written at ep_size 2 load at ep_size 1 --------------------------------------------
def reshard_worker(rank, world, out):
    from safetensors.torch import save_file

    from adamole_dist.adapters.files import adapter_state, save_adapter
    from adamole_dist.parallel.layout import build_layout
    from adamole_dist.train.checkpoint import expert_state

    layout = build_layout(2, N)
    model, adapters = build("adamole", layout)
    ids, mask = global_batch()
    _, expert_opt = optimizers(model, adapters, world, layout.edp_group)
    model.train()
    task_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
    expert_opt.step()  # gives the experts AdamW moments to reshard
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    save_file(expert_state(adapters, expert_opt), str(Path(out) / f"experts_ep{layout.ep_rank}.safetensors"))
    tensors = adapter_state(adapters, ep_group=layout.ep_group, ep_size=2)
    if rank == 0:
        save_adapter(Path(out) / "adapter", tensors, adapters.cfg, {"task_type": "causal_lm", "trainable_modules": []})
        torch.save(logits, Path(out) / "logits_ep2.pt")


def test_checkpoint_at_ep2_loads_at_ep1(tmp_path):
    from safetensors.torch import load_file

    from adamole_dist.adapters.files import load_adapter
    from adamole_dist.moe.experts import expert_key, file_orientation
    from adamole_dist.train.checkpoint import load_expert_state

    run_ranks(reshard_worker, 2, str(tmp_path))
    ids, mask = global_batch()
    fresh = tiny_llama()
    adapters = load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        logits = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits_ep2.pt"), atol=1e-6, rtol=1e-6)
    # the training checkpoint's expert shards reshard into one rank, optimizer moments included
    model, one = build("adamole")
    _, expert_opt = optimizers(model, one, 1)
    tensors = {}
    for f in sorted(tmp_path.glob("experts_ep*.safetensors")):
        tensors.update(load_file(str(f)))
    assert load_expert_state(one, expert_opt, tensors)
    for name, bank in one.expert_banks.items():
        torch.testing.assert_close(bank.lora_A, adapters.expert_banks[name].lora_A)
        torch.testing.assert_close(bank.lora_B, adapters.expert_banks[name].lora_B)
        for pname in ("lora_A", "lora_B"):  # each expert's moments, written by its EP owner, on its global id
            state = expert_opt.optimizer.state[getattr(bank, pname)]
            for gid in range(N):
                for m in ("exp_avg", "exp_avg_sq"):
                    stored = tensors[expert_key(name, gid, pname) + f".{m}"]
                    assert torch.equal(state[m][gid], file_orientation(pname, stored))
            assert len({state["exp_avg"][gid].abs().sum().item() for gid in range(N)}) == N  # distinct per expert


# -- no tokens, no hang -----------------------------------------------------------------------------
def empty_worker(rank, world, out):
    from adamole_dist.parallel.layout import build_layout

    layout = build_layout(2, N)
    ids, mask = global_batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    m = mask[mine].clone()
    if rank == 1:
        m.zero_()  # rank 1 has only padding: it sends nothing, yet must join every exchange
    model, adapters = build("topk", layout, balance_bias_rate=1.0)
    model.train()
    for router in adapters.routers().values():  # experts 0 and 1 win every token: rank 1 receives nothing
        router.selection_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
    out_logits = model(input_ids=ids[mine], attention_mask=m).logits
    out_logits.float().pow(2).mean().backward()
    counters = next(iter(adapters.layers.values())).dispatcher.counters
    stats = adapters.context.stats
    torch.save({"calls": counters.calls, "bytes": counters.bytes_sent,
                "load": sum(v[6:] for v in stats.values())}, Path(out) / f"empty{rank}.pt")


def test_rank_without_tokens_does_not_hang(tmp_path):
    run_ranks(empty_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"empty{r}.pt") for r in range(2))
    assert r0["calls"] == r1["calls"] > 0  # both ranks joined every all-to-all, forward and backward
    assert r1["bytes"] == 0  # rank 1 had no tokens and received none to return
    assert r0["load"][2:].sum() == 0 and r0["load"][:2].sum() > 0  # nothing routed to rank 1's experts


# -- bf16: EP agrees with the local path as well as the precision allows -----------------------------
def bf16_worker(rank, world, out):
    from adamole_dist.parallel.layout import build_layout

    layout = build_layout(2, N)
    ids, mask = global_batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for case in ("adamole", "topk"):
        model, adapters = bf16_model(case, layout)
        logits = model(input_ids=ids[mine], attention_mask=mask[mine]).logits
        logits.float().pow(2).mean().backward()
        results[case] = {"logits": logits.detach().float(),
                         "grads": {n: b.lora_B.grad.float().clone() for n, b in adapters.expert_banks.items()}}
    torch.save(results, Path(out) / f"bf16_rank{rank}.pt")


def bf16_model(case, layout=None):
    """DeepSpeed's bf16 set-up: the module (base, routers) in bf16, the expert banks (outside the
    engine) in fp32."""
    model, adapters = build(case, layout)
    model.to(torch.bfloat16).train()
    assert all(p.dtype == torch.float32 for p in adapters.expert_parameters())
    return model, adapters


@pytest.fixture(scope="module")
def bf16_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    run_ranks(bf16_worker, 2, str(out))
    return [torch.load(out / f"bf16_rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", ["adamole", "topk"])
def test_bf16_activations_with_fp32_experts_match_the_local_path(bf16_results, case):
    """Routing weights cross the bf16 wire bit for bit (as fp32) and the partial deltas return and sum
    in fp32, so the forward equals the local path's (before: 8.8e-3 / 1.7e-1 apart on these logits).
    Gradients of upstream layers differ by the bf16 rounding of each destination's share of a
    token's input gradient (printed); the last adapted layer's expert gradients agree."""
    ranks = [r[case] for r in bf16_results]
    model, adapters = bf16_model(case)
    ids, mask = global_batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    sum(logits[r * PER_RANK:(r + 1) * PER_RANK].float().pow(2).mean() for r in range(2)).backward()
    ep_logits = torch.cat([r["logits"] for r in ranks])
    one_ulp = 2.0 ** -8 * logits.float().abs().max().item()
    assert (ep_logits - logits.float()).abs().max().item() <= one_ulp
    rel = {}
    for name, bank in adapters.expert_banks.items():
        ep_grad = torch.cat([r["grads"][name] for r in ranks])
        assert torch.isfinite(ep_grad).all()
        rel[name] = ((ep_grad - bank.lora_B.grad).abs().max() / bank.lora_B.grad.abs().max()).item()
    last = list(adapters.expert_banks)[-1]
    assert rel[last] <= 1e-3, rel
    print(f"bf16 {case}: logits max|d| {(ep_logits - logits.float()).abs().max().item():.1e} (1 ulp {one_ulp:.1e}); "
          f"expert-grad relative max|d| per layer: "
          + ", ".join(f"{n.split('layers.')[-1]} {v:.1e}" for n, v in rel.items()))


# -- dense routing: every token to the other rank, x itself on the wire -----------------------------
DENSE_T, DENSE_D = 40, 24


def dense_inputs(rank: int, only_local: int):
    """Rank ``rank``'s tokens, fp32 weights and kept pairs for N experts: every pair kept except that
    the first ``only_local`` tokens keep only experts of this rank (their rows pad a send-all)."""
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(DENSE_T, DENSE_D, generator=g)
    kept = torch.ones(DENSE_T, N, dtype=torch.bool)
    remote = slice((1 - rank) * N // 2, (2 - rank) * N // 2)
    kept[:only_local, remote] = False
    weights = torch.rand(DENSE_T, N, generator=g) * kept
    return x, weights, kept


def dense_bank(expert_slice):
    from adamole_dist.moe.experts import ExpertBank

    torch.manual_seed(3)
    bank = ExpertBank(expert_slice[1], RANK, DENSE_D, DENSE_D, 2.0, first_expert=expert_slice[0], total_experts=N)
    with torch.no_grad():
        bank.lora_B.copy_(torch.randn(N, RANK, DENSE_D, generator=torch.Generator().manual_seed(4))
                          [expert_slice[0]:expert_slice[0] + expert_slice[1]])
    return bank


def dense_worker(rank, world, out):
    from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher
    from adamole_dist.parallel.layout import build_layout

    layout = build_layout(2, N)
    results = {}
    for only_local, overlap in ((0, True), (1, True), (1, False)):
        # 40/40 tokens need the other rank (x itself), 39/40 (x itself + 1 pad row); overlapped or not
        dispatcher = ExpertParallelDispatcher(layout, overlap=overlap)
        bank = dense_bank(layout.expert_slice(N))
        x, weights, kept = dense_inputs(rank, only_local)
        x.requires_grad_(True)
        weights.requires_grad_(True)
        y = dispatcher(x, weights, kept, bank, "dense")
        y.pow(2).sum().backward()
        c = dispatcher.counters
        results[only_local, overlap] = {"y": y.detach(), "dx": x.grad, "dw": weights.grad, "dA": bank.lora_A.grad,
                               "dB": bank.lora_B.grad, "sent": c.bytes_sent, "min": c.bytes_min}
    torch.save(results, Path(out) / f"dense_rank{rank}.pt")


def test_dense_routing_sends_x_itself_and_equals_the_local_path(tmp_path):
    """When the other rank needs (almost) every token, x itself goes on the wire (padded with rows
    that carry no kept expert) and its share comes back as a plain sum: outputs and every gradient
    equal the all-local computation, with the exchanges overlapped with the local experts or waited
    for, and the padding is sent but not counted in the minimum."""
    run_ranks(dense_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"dense_rank{r}.pt") for r in range(2)]
    for only_local, overlap in ((0, True), (1, True), (1, False)):
        full = dense_bank((0, N))
        dA, dB = torch.zeros_like(full.lora_A), torch.zeros_like(full.lora_B)
        for rank in range(2):
            x, weights, kept = dense_inputs(rank, only_local)
            x.requires_grad_(True)
            weights.requires_grad_(True)
            full.zero_grad()
            y = full(x, weights, kept, "dense")
            y.pow(2).sum().backward()
            dA += full.lora_A.grad
            dB += full.lora_B.grad
            r = ranks[rank][only_local, overlap]
            torch.testing.assert_close(r["y"], y.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r["dx"], x.grad, atol=1e-5, rtol=1e-5)
            # a pair that is not kept weighs 0 whatever its gradient: the routers' backward multiplies
            # by the mask (routing.renormalize), so only kept pairs' weight gradients reach anything
            torch.testing.assert_close(r["dw"] * kept, weights.grad * kept, atol=1e-5, rtol=1e-5)
            # rows: D out + D grads back; deltas: O back + O grads out; routing columns: L each way
            row_bytes = (2 * DENSE_D + 2 * DENSE_D) * 4
            needed = DENSE_T - only_local
            assert r["min"] == needed * row_bytes
            assert r["sent"] == DENSE_T * (row_bytes + 2 * (N // 2) * 4)  # every token on the wire
        for rank in range(2):  # each owner's expert gradients sum both ranks' tokens
            first = rank * N // 2
            for got, ref in ((ranks[rank][only_local, overlap]["dA"], dA),
                             (ranks[rank][only_local, overlap]["dB"], dB)):
                ref = ref[first:first + N // 2]  # summed in another order: fp32 rounding of the largest terms
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
