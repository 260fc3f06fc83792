"""Batches of tokenized SFT examples: padded rows, or packed rows with exact per-example attention.

A tokenized example is ``{"input_ids": [...], "labels": [...]}`` (labels aligned, ``IGNORE`` where
not a target; the loss is the shifted one, logits[:, :-1] predict labels[:, 1:]). Every batch
holds CPU tensors ``input_ids``, ``labels``, ``attention_mask`` [B, S] (1 = real token, 0 = padding)
and ``segment_ids`` [B, S] (the example's index in the batch, row-major; -1 on padding). A packed
batch also holds ``position_ids`` [B, S] restarting at 0 per example, and the flattened segment
boundaries ``cu_seq_lens`` / ``max_seq_len`` that flash-attention's varlen kernels need.

How a packed row keeps attention inside each example (transformers' own packed-sequence path):
the model gets ``position_ids``, NO 2-D attention mask and ``use_cache=False`` (with a mask or a
KV cache transformers skips the packed-sequence detection and lets examples see each other,
silently; an eval-mode model builds a cache by default). transformers then
finds the example boundaries where position ids do not step by one (masking_utils
``find_packed_sequence_indices``) and builds a block-diagonal causal mask for sdpa, eager and
flex_attention; flash_attention_2/3/4 instead read ``cu_seq_lens_q/k`` + ``max_length_q/k`` and run
the varlen kernel over the flattened rows. The padding at the end of a row is its own segment
(positions 0, 1, ...), so a real token never attends to it and no query row is fully masked.
Because the model sees no attention mask, the adapters' valid-token mask travels in the extra
kwarg ``TOKEN_MASK_KWARG``, which the adapters' forward pre-hook removes before the model runs
(adapters/inject.py): padding stays out of routing, aux loss and routing statistics.

Labels never cross a boundary: the first label of every packed example is ``IGNORE`` (it would be
predicted from the previous example's last token).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.examples import IGNORE
from adamole_dist.model_kwargs import TOKEN_MASK_KWARG

# attn_implementation values whose transformers kernels honour the packed-sequence format above:
# sdpa, eager and flex_attention through the packed mask (checked on CPU, tests/unit/data/test_packing.py),
# flash_attention_2/3/4 through the varlen arguments (transformers' _flash_attention_forward).
# Others (paged|eager, kernels from the Hub) are refused: nothing says they keep examples apart.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4")

# Decoders whose attention ignores the packed mask (tests/unit/adapters/test_architectures.py measures it):
# BLOOM's ALiBi and OPT's learned positions come from the attention mask, not position_ids; GPT-OSS's
# attention (sinks, sliding window) does not take transformers' packed-sequence mask.
PACKING_UNSUPPORTED_TYPES = ("bloom", "opt", "gpt_oss")


def _check_example(ex: dict, where: str) -> int:
    n = len(ex["input_ids"])
    assert n > 0, f"{where}: empty example"
    assert len(ex["labels"]) == n, f"{where}: {len(ex['labels'])} labels for {n} input ids"
    return n


def collate_padded(examples: list[dict], pad_id: int) -> dict:
    """One example per row, right padding to the longest (labels IGNORE, attention_mask 0 there)."""
    lengths = [_check_example(ex, f"example {i}") for i, ex in enumerate(examples)]
    B, S = len(examples), max(lengths)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    segment_ids = torch.full((B, S), -1, dtype=torch.long)
    for b, (ex, n) in enumerate(zip(examples, lengths)):
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        segment_ids[b, :n] = b
    return {"input_ids": input_ids, "labels": labels, "attention_mask": (segment_ids >= 0).long(),
            "segment_ids": segment_ids}


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most ``max_length``.

    Best-fit decreasing: examples from longest to shortest (ties by index), each into the open row
    with the least room that still fits it, else a new row. Deterministic (a function of the lengths
    only); rows come in the order they were opened, a row's examples in the order they were placed.
    O(n log n) plus list insertions, fine for 10^5..10^6 examples. An example longer than
    ``max_length`` is the caller's error (truncate or drop it first).
    """
    for i, n in enumerate(lengths):
        assert 0 < n <= max_length, f"example {i}: length {n} not in 1..max_length ({max_length})"
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted; full rows leave it
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, r = max_length - n, len(rows) - 1
        else:
            free, r = room.pop(at)
            rows[r].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, r))
    return rows


def collate_packed(rows: list[list[dict]], pad_id: int, max_length: int) -> dict:
    """Each row the concatenation of its examples, right padded to the longest row (<= max_length)."""
    row_lengths = []
    for r, row in enumerate(rows):
        assert row, f"row {r}: no examples"
        total = sum(_check_example(ex, f"row {r} example {k}") for k, ex in enumerate(row))
        assert total <= max_length, f"row {r}: {total} tokens exceed max_length ({max_length})"
        row_lengths.append(total)
    B, S = len(rows), max(row_lengths)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, S), dtype=torch.long)
    segment_ids = torch.full((B, S), -1, dtype=torch.long)
    seq_lens: list[int] = []  # every segment of the flattened rows, padding segments included
    example = 0
    for b, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex["input_ids"])
            input_ids[b, at:at + n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            labels[b, at:at + n] = torch.tensor(ex["labels"], dtype=torch.long)
            labels[b, at] = IGNORE  # never predicted from the previous example
            position_ids[b, at:at + n] = torch.arange(n)
            segment_ids[b, at:at + n] = example
            seq_lens.append(n)
            at, example = at + n, example + 1
        if at < S:  # the padding is a segment of its own: positions restart, nothing real sees it
            position_ids[b, at:] = torch.arange(S - at)
            seq_lens.append(S - at)
    cu_seq_lens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(seq_lens).cumsum(0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": (segment_ids >= 0).long(),
            "segment_ids": segment_ids, "position_ids": position_ids,
            "cu_seq_lens": cu_seq_lens, "max_seq_len": max(seq_lens)}


def model_inputs(batch: dict) -> dict:
    """Exactly the keyword arguments for the (adapted) HF model: ``model(**model_inputs(batch))``.

    Padded: input_ids + attention_mask. Packed: input_ids + position_ids, no attention mask and no
    KV cache (transformers' packed-sequence path, see the module docstring), flash-attention's
    varlen arguments, and the valid-token mask for the adapters under ``TOKEN_MASK_KWARG``.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
    return {
        "input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
        TOKEN_MASK_KWARG: batch["attention_mask"],
    }


def hf_config(model):
    """The transformers config of ``model``, or of the model inside a DeepSpeed engine (its ``.module``; the
    engine's own ``.config`` is DeepSpeed's); None for a model without one."""
    from transformers import PretrainedConfig

    for candidate in (model, getattr(model, "module", None)):
        config = getattr(candidate, "config", None)
        if isinstance(config, PretrainedConfig):
            return config
    return None


def check_packing_attention(model) -> None:
    """ConfigError unless packed rows get exact per-example attention in this model.

    ``model`` may be a DeepSpeed engine (its ``.module`` is the HF model).
    """
    config = hf_config(model)
    if config is None:
        raise ConfigError("packing: the model has no transformers config; packing needs a Hugging Face causal LM")
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True) \
            or getattr(config, "model_type", None) in ("bert", "roberta"):
        raise ConfigError(f"packing: model type {config.model_type!r} is not a causal decoder; "
                          "packing needs one (--no-packing)")
    if getattr(config, "model_type", None) in PACKING_UNSUPPORTED_TYPES:
        raise ConfigError(f"packing: model type {config.model_type!r} lets packed examples attend to each other "
                          "(its positions or attention ignore the packed mask); train it with --no-packing")
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in PACKING_ATTENTION:
        raise ConfigError(
            f"packing: attn_implementation {impl!r} cannot keep attention inside each packed example; "
            f"use one of {', '.join(PACKING_ATTENTION)}, or --no-packing"
        )


def padding_fraction(batch: dict) -> float:
    """Share of the batch's token slots that are padding (what packing and length grouping shrink)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()
