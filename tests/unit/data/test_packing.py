"""Packing (data/batching.py): packed rows train exactly like the same examples in a padded batch.

Equivalence is checked like with like: the same set of examples once as one padded batch and once
as one packed batch, on a tiny Llama with adamole adapters (aux loss on), fp32, dropout off. Per-
example losses, every trainable gradient (routers and the expert banks outside the module tree),
the aux loss and the routing statistics must agree to fp32 rounding: losses (summed per example,
up to ~50) and the aux loss (~25) to 1e-5 absolute (measured: 0 and 2e-6); every gradient tensor
to 1e-5 absolute (largest entries ~0.4, measured differences <= 2e-6) and to 1e-3 of its own
largest entry (measured <= 3e-4); the statistics are sums of counts and match to 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F

from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.data.batching import (
    check_packing_attention,
    collate_packed,
    collate_padded,
    model_inputs,
    pack_examples,
    padding_fraction,
)
from adamole_dist.data.examples import IGNORE
from tests.conftest import make_tiny_bert, make_tiny_llama

PAD = 0
ATOL = 1e-5


def make_examples(lengths, seed=0, vocab=128):
    """Examples with a prompt (IGNORE labels, the first token's always) and a target part."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, max(n - 1, 1) + 1, (1,), generator=g))
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def per_example_losses(logits, batch) -> torch.Tensor:
    """Summed shifted cross entropy per example (segment_ids say which example a target is in)."""
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    seg = batch["segment_ids"][:, 1:].reshape(-1)
    take = (targets.reshape(-1) != IGNORE)
    n = int(batch["segment_ids"].max()) + 1
    return torch.zeros(n, dtype=ce.dtype).index_add(0, seg[take], ce.reshape(-1)[take])


def adapted_llama(attn="sdpa", checkpointing=False):
    model = make_tiny_llama(seed=0)
    model.config._attn_implementation = attn
    cfg = AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0, aux_loss_coeff=0.1)
    adapters = inject_adapters(model, cfg)
    if checkpointing:
        enable_gradient_checkpointing(model, adapters.context)
    torch.manual_seed(1)
    with torch.no_grad():  # experts start with B = 0; give both LoRA factors values so every gradient flows
        for p in adapters.expert_parameters():
            p.normal_(0.0, 0.3)
    adapters.train()
    return model, adapters


def train_pass(model, adapters, batch):
    """One forward + backward: mean target loss + coeff * aux loss. Returns what must be equal."""
    params = adapters.engine_parameters() + adapters.expert_parameters()
    for p in params:
        p.grad = None
    adapters.context.pop_stats()
    logits = model(**model_inputs(batch)).logits
    losses = per_example_losses(logits, batch)
    num_targets = (batch["labels"][:, 1:] != IGNORE).sum()
    aux = adapters.aux_loss()
    (losses.sum() / num_targets + adapters.cfg.aux_loss_coeff * aux).backward()
    return losses.detach(), aux.detach(), [p.grad.clone() for p in params], adapters.context.pop_stats()


@pytest.mark.parametrize("attn,checkpointing", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_batch_trains_like_padded_batch(attn, checkpointing):
    lengths = [9, 3, 14, 6, 2, 11, 5, 8]
    examples = make_examples(lengths)
    rows = pack_examples(lengths, max_length=16)
    assert len(rows) < len(examples)  # several examples per row, or the test shows nothing
    packed = collate_packed([[examples[i] for i in row] for row in rows], PAD, 16)
    order = [i for row in rows for i in row]  # packed segment k is example order[k]
    padded = collate_padded([examples[i] for i in order], PAD)

    model, adapters = adapted_llama(attn)
    loss_pad, aux_pad, grads_pad, stats_pad = train_pass(model, adapters, padded)
    if checkpointing:  # the packing kwargs reach every block through its checkpoint and replay
        model, adapters = adapted_llama(attn, checkpointing=True)
    loss_pack, aux_pack, grads_pack, stats_pack = train_pass(model, adapters, packed)

    torch.testing.assert_close(loss_pack, loss_pad, atol=ATOL, rtol=0)
    torch.testing.assert_close(aux_pack, aux_pad, atol=ATOL, rtol=0)
    assert len(grads_pad) == len(adapters.engine_parameters()) + len(adapters.expert_parameters()) > 0
    for g_pack, g_pad in zip(grads_pack, grads_pad):
        assert g_pad.abs().max() > 0
        torch.testing.assert_close(g_pack, g_pad, atol=ATOL, rtol=0)
        assert (g_pack - g_pad).abs().max() <= 1e-3 * g_pad.abs().max()
    assert stats_pack.keys() == stats_pad.keys() and stats_pad
    real_tokens = sum(lengths)
    for name in stats_pad:
        assert stats_pad[name][0] == real_tokens  # each real token counted once, padding never
        torch.testing.assert_close(stats_pack[name], stats_pad[name], rtol=1e-6, atol=1e-6)


def test_packing_without_block_mask_would_differ():
    """The same packed rows fed with a plain 2-D mask (attention across examples) give other losses:
    the equivalence above is not vacuous."""
    lengths = [9, 3, 14, 6, 2, 11, 5, 8]
    examples = make_examples(lengths)
    rows = pack_examples(lengths, max_length=16)
    packed = collate_packed([[examples[i] for i in row] for row in rows], PAD, 16)
    model, _ = adapted_llama()
    with torch.no_grad():
        exact = per_example_losses(model(**model_inputs(packed)).logits, packed)
        leaky = per_example_losses(model(input_ids=packed["input_ids"],
                                         attention_mask=packed["attention_mask"]).logits, packed)
    assert (exact - leaky).abs().max() > 1e-3


def test_padding_in_packed_rows_stays_out_of_routing():
    examples = make_examples([5, 4, 3])
    packed = collate_packed([[examples[0], examples[1]], [examples[2]]], PAD, 10)
    model, adapters = adapted_llama()
    seen = []
    layer = next(iter(adapters.layers.values()))
    layer.register_forward_pre_hook(lambda m, a: seen.append(adapters.context.valid_tokens(a[0].shape[:-1])))
    with torch.no_grad():
        model(**model_inputs(packed))
    assert seen[0].tolist() == [True] * 9 + [True] * 3 + [False] * 6
    assert all(s[0] == 12 for s in adapters.context.pop_stats().values())


def test_position_ids_restart_and_labels_never_cross():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                {"input_ids": [8, 9], "labels": [8, 9]},  # a first label that is not IGNORE gets IGNORE
                {"input_ids": [10, 11, 12, 13], "labels": [IGNORE, IGNORE, 12, 13]}]
    batch = collate_packed([[examples[0], examples[1]], [examples[2]]], PAD, 8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, IGNORE, 12, 13, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 9, 10] and batch["max_seq_len"] == 4
    assert padding_fraction(batch) == pytest.approx(0.1)
    kwargs = model_inputs(batch)
    assert "attention_mask" not in kwargs and kwargs["use_cache"] is False


def test_collate_padded():
    batch = collate_padded([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
                            {"input_ids": [4], "labels": [IGNORE]}], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_pack_examples_fits_every_example_once_deterministically():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 65, (500,), generator=g).tolist()
    rows = pack_examples(lengths, max_length=64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == pack_examples(lengths, max_length=64)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing packs tightly
    assert pack_examples([3, 5, 2, 6], 8) == [[3, 2], [1, 0]]
    with pytest.raises(AssertionError, match="example 1: length 9"):
        pack_examples([3, 9], 8)
    with pytest.raises(AssertionError, match="exceed max_length"):
        collate_packed([make_examples([5, 5])], PAD, 8)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_packing_attention_supported(impl):
    model = make_tiny_llama()
    model.config._attn_implementation = impl
    check_packing_attention(model)


def test_packing_attention_refused():
    model = make_tiny_llama()
    model.config._attn_implementation = "paged|eager"
    with pytest.raises(ConfigError, match=r"attn_implementation 'paged\|eager'"):
        check_packing_attention(model)
    with pytest.raises(ConfigError, match="not a causal decoder"):
        check_packing_attention(make_tiny_bert())


def test_flex_attention_keeps_packed_examples_apart():
    model = make_tiny_llama()
    model.config._attn_implementation = "flex_attention"
    assert_packed_rows_match_separate_examples(model)


def _tiny(model_type):
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[model_type]
    extra = {"head_dim": 8} if model_type == "gemma" else {}
    return model_cls(config_cls(**common, **extra)).eval()


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gemma"])
def test_other_decoders_keep_packed_examples_apart(model_type):
    assert_packed_rows_match_separate_examples(_tiny(model_type))


def assert_packed_rows_match_separate_examples(model):
    examples = make_examples([6, 4, 5])
    packed = collate_packed([examples[:2], examples[2:]], PAD, 10)
    with torch.no_grad():
        logits = model(**model_inputs(packed)).logits
        for k, (b, at) in enumerate([(0, 0), (0, 6), (1, 0)]):
            alone = model(input_ids=torch.tensor([examples[k]["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[b, at:at + len(alone)], alone, atol=ATOL, rtol=0)
