"""Continuous batching through the KV cache: a running batch whose sequences joined at different steps and
leave as each one finishes, one model forward per step for all of them.

The batch keeps every sequence's keys and values in one DynamicCache, its rows left-padded to a common
length, and an attention mask that marks the padding, so padding is never attended to and never routed
(the adapters' forward pre-hook reads the mask: adapters/context.py). A sequence joins after a prefill of
its own (``prefill``: the joiners of one step together, left-padded as ``left_padded`` pads generate's
batches): ``RunningBatch.add`` pads the shorter side of the caches on the left and stacks the rows.
``RunningBatch.keep`` drops finished rows and trims the columns that became padding in every row, so
memory follows the sequences that are still running. Each row's positions count its real tokens only
(as ``generate`` numbers a left-padded row), so a sequence computes the same whether it runs alone or
beside others: rotary positions are baked into the cached keys, and padded slots are masked out.

Layers are plain full-attention ``DynamicLayer`` s (a ``DynamicCache()`` built without a config): a
sliding-window model keeps its whole history here and masks it itself. Tested on the Llama family.

Tensor names (adamole_dist/glossary.py): B rows (sequences), C cached positions, W vocabulary."""

from __future__ import annotations

import functools
import inspect

import torch

from adamole_dist.generation.batched import left_padded


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def forward_keywords(model, cache, all_logits: bool) -> dict:
    """The KV cache under the keyword this transformers names it (``cache`` since 5.x renamed it, else
    ``past_key_values``), and how many positions get logits (all, or the last one only)."""
    params = _forward_parameters(type(model))
    keep = {"logits_to_keep": 0 if all_logits else 1} if "logits_to_keep" in params else {}
    return {("cache" if "cache" in params else "past_key_values"): cache, **keep}


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def positions_of(mask_BC: torch.Tensor) -> torch.Tensor:
    """Each real token's position counted from its row's first real token (padding: 0), as ``generate``
    numbers left-padded rows."""
    return (mask_BC.cumsum(-1) - 1).masked_fill(mask_BC == 0, 0)


def forward(model, ids_BC: torch.Tensor, mask_BC: torch.Tensor, positions_BC: torch.Tensor, cache,
            all_logits: bool = False) -> torch.Tensor:
    """One forward through ``cache`` (filled in place): logits of the last position [B, W], or of every
    position [B, C, W] with ``all_logits`` (a prompt's log-likelihoods)."""
    out = model(input_ids=ids_BC, attention_mask=mask_BC, position_ids=positions_BC, use_cache=True,
                **forward_keywords(model, cache, all_logits))
    return out.logits if all_logits else out.logits[:, -1]


def prefill(model, rows: list[list[int]], pad_id: int, all_logits: bool = False):
    """(cache, mask [B, C], logits) of prompts run together, left-padded; see ``forward`` for the logits."""
    ids_BC, mask_BC = left_padded(rows, pad_id, next(model.parameters()).device)
    cache = new_cache()
    logits = forward(model, ids_BC, mask_BC, positions_of(mask_BC), cache, all_logits)
    return cache, mask_BC, logits


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RunningBatch:
    """The rows of one model's running sequences: their KV cache and attention mask [B, C] (see the module
    docstring). Row order is the order of ``add``; ``keep`` selects rows by index."""

    def __init__(self) -> None:
        self.cache = None
        self.mask_BC: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask_BC is None else self.mask_BC.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask_BC is None else self.mask_BC.shape[1]

    def add(self, cache, mask_BC: torch.Tensor) -> None:
        """Append the rows of a prefilled ``cache`` (with its mask) below the running ones."""
        if self.mask_BC is None:
            self.cache, self.mask_BC = cache, mask_BC
            return
        width = max(self.width, mask_BC.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask_BC = torch.cat([_left_pad(self.mask_BC, width, 1), _left_pad(mask_BC, width, 1)])

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay (in this order); columns that are padding in every remaining row go."""
        if not rows:
            self.cache, self.mask_BC = None, None
            return
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows, device=self.mask_BC.device)
        mask = self.mask_BC.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # the first column some row still uses
        self.mask_BC = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def step(self, model, tokens: list[int]) -> torch.Tensor:
        """Feed each row its last chosen token; the logits of the next one [B, W]."""
        device = self.mask_BC.device
        ids_B1 = torch.tensor(tokens, dtype=torch.long, device=device).view(-1, 1)
        positions_B1 = self.mask_BC.sum(-1, keepdim=True)  # the new token follows the row's real tokens
        self.mask_BC = torch.cat([self.mask_BC, torch.ones_like(ids_B1)], dim=1)
        return forward(model, ids_B1, self.mask_BC, positions_B1, self.cache)
