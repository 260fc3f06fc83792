"""The chunked LM-head loss (base_model/chunked_loss.py) against the plain loss from the full logits.

fp32 throughout. "Equal" is the issue's bound: each tensor's difference within 1e-6 of its own norm
(sums of the same products in another order differ by rounding only, ~1e-7); the loss as a scalar to
1e-6 relative; gradients deeper in the model to 2e-5 (see the SFT test: rounding grows on the way).
Checked: the autograd node alone (with and without a bias, chunks that do not divide the tokens,
ignored targets), and the SFT task on a tiny Llama with adamole adapters -- padded and
packed batches with prompt (ignored) labels, a separate and a tied LM head -- comparing the loss,
the gradients of the adapters, of the experts, of the head (and the tied embedding) and of the final
hidden states, and the held-out per-token losses.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model import chunked_loss
from adamole_dist.base_model.chunked_loss import LinearCrossEntropySum, install, token_losses, why_not_chunked
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.batching import collate_packed, collate_padded, pack_examples
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.sft_task import SFTTask
from tests.conftest import make_tiny_bert

REL = 1e-6


def assert_equal(got: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> None:
    scale = max(float(ref.norm()), 1e-30)
    assert float((got - ref).norm()) <= rel * scale, f"{what}: |diff| {float((got - ref).norm()):.3g} of {scale:.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_the_node_gives_the_plain_loss_and_gradients(bias, chunk):
    g = torch.Generator().manual_seed(0)
    T, D, V = 37, 16, 50
    h = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    target = torch.randint(0, V, (T,), generator=g)
    target[torch.rand(T, generator=g) < 0.3] = IGNORE
    plain = F.cross_entropy(F.linear(h, w, b), target, ignore_index=IGNORE, reduction="sum")
    ref = torch.autograd.grad(plain * 0.37, [h, w] + ([b] if bias else []))
    chunked = LinearCrossEntropySum.apply(h, w, b, target, chunk)
    got = torch.autograd.grad(chunked * 0.37, [h, w] + ([b] if bias else []))
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=REL)
    for name, a, r in zip(("hidden", "weight", "bias"), got, ref):
        assert_equal(a, r, name)
    assert (got[0][target == IGNORE] == 0).all()  # an ignored position has no gradient
    per_token = token_losses(h.detach(), w.detach(), b, target, chunk)
    assert_equal(per_token, F.cross_entropy(F.linear(h, w, b), target, ignore_index=IGNORE,
                                            reduction="none").detach(), "per-token losses")


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0))
    with torch.no_grad():  # B starts at zero; values in both factors so every gradient flows
        for p in adapters.expert_parameters():
            p.normal_(0.0, 0.3)
    model.get_output_embeddings().weight.requires_grad_(True)  # the head's gradient is compared too
    model.get_input_embeddings().weight.requires_grad_(True)
    return model, adapters


def sft_batch(packing: bool) -> dict:
    """Examples whose prompts are ignored labels (--loss_on assistant), padded or packed."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in [9, 3, 14, 6, 2, 11, 5, 8]:
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n, (1,), generator=g)) if n > 1 else 1
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    if not packing:
        return collate_padded(examples, 0)
    rows = pack_examples([len(e["input_ids"]) for e in examples], max_length=16)
    return collate_packed([[examples[i] for i in row] for row in rows], 0, 16)


def loss_and_grads(model, adapters, task, batch):
    """(loss, {name: gradient} of the model's trainable parameters and the experts, the final hidden
    states' gradient)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"experts.{i}", p) for i, p in enumerate(adapters.expert_parameters())]
    for _, p in named:
        p.grad = None
    final = {}

    def keep(module, args, out):
        out.retain_grad()
        final["h"] = out

    hook = model.model.norm.register_forward_hook(keep)
    loss = task.loss(model, batch)
    loss.backward()
    hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in named}, final["h"].grad.clone()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_the_sft_loss_and_every_gradient_equal_the_plain_ones(tied, packing):
    """The loss, the head's gradient and the final hidden states' gradient (what the chunked node
    computes) to 1e-6. The layers below get that hidden-state gradient (~3e-7 apart: fp32 rounding of
    sums taken in another order) and carry it back through attention and the routers, where rounding
    grows it: every other gradient to 2e-5 (measured <= 8e-6; the same in an fp64 model, since both
    losses take the softmax in fp32)."""
    model, adapters = tiny_llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    task = SFTTask(SimpleNamespace(pad_token_id=0, eos_token_id=1), max_length=16)
    batch = sft_batch(packing)
    assert (batch["labels"] == IGNORE).any() and (batch["labels"] != IGNORE).any()
    ref_loss, ref_grads, ref_h = loss_and_grads(model, adapters, task, batch)
    with torch.no_grad():
        ref_eval = task.token_losses(model, batch)
    task.chunked_head = install(model, chunk_tokens=5)
    assert task.chunked_head is not None
    loss, grads, h_grad = loss_and_grads(model, adapters, task, batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=REL)
    assert_equal(h_grad, ref_h, "final hidden states' gradient")
    if not tied:  # a tied head's gradient also holds the embedding's, from the bottom of the model
        assert_equal(grads["lm_head.weight"], ref_grads["lm_head.weight"], "LM head")
    assert set(grads) == set(ref_grads) and len(grads) > 10
    for name, ref in ref_grads.items():
        assert_equal(grads[name], ref, name, rel=2e-5)
    with torch.no_grad():
        assert_equal(task.token_losses(model, batch), ref_eval, "held-out token losses")


def test_under_bf16_autocast_it_follows_the_plain_loss():
    """bf16 matmuls (the head's too), the softmax in fp32: both losses round the same products to bf16,
    so they agree to bf16 rounding of the sums (loss measured 2e-7, hidden-state gradient 3e-3), not exactly."""
    model, adapters = tiny_llama(tied=True)
    task = SFTTask(SimpleNamespace(pad_token_id=0, eos_token_id=1), max_length=16, autocast="bf16")
    batch = sft_batch(packing=False)
    ref_loss, ref_grads, ref_h = loss_and_grads(model, adapters, task, batch)
    task.chunked_head = install(model, chunk_tokens=5)
    loss, grads, h_grad = loss_and_grads(model, adapters, task, batch)
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-2)
    assert_equal(h_grad.float(), ref_h.float(), "final hidden states' gradient", rel=3e-2)
    assert all(grads[name].dtype == torch.float32 for name in ref_grads)
    # all gradients as one vector: a few tiny ones (a threshold bias's, ~1e-3, sums that nearly cancel)
    # carry bf16 rounding of their own size
    flat = torch.cat([grads[name].flatten() for name in ref_grads])
    assert_equal(flat, torch.cat([ref.flatten() for ref in ref_grads.values()]), "all gradients", rel=3e-2)


def test_without_targets_the_head_gives_the_plain_logits():
    model, _ = tiny_llama(tied=True)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        head = install(model, chunk_tokens=3)
        assert head is not None and install(model, chunk_tokens=3) is head  # installed once
        assert torch.equal(model(input_ids=ids).logits, before)
    assert set(model.state_dict()) == set(tiny_llama(tied=True)[0].state_dict())


def test_it_is_not_installed_where_it_would_not_be_exact():
    model, _ = tiny_llama(tied=False)
    model.config.final_logit_softcapping = 30.0
    assert why_not_chunked(model) == "the model soft-caps its final logits" and install(model, 8) is None
    assert "no linear output embedding" in why_not_chunked(make_tiny_bert()) and install(make_tiny_bert(), 8) is None


def test_one_ignore_label():
    assert chunked_loss.IGNORE == IGNORE  # base_model/ cannot import data/: the value is written twice


def test_the_chunk_size_must_be_positive():
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=0)
    assert TrainConfig().chunked_loss and "chunked_loss" in TrainConfig().to_dict()
