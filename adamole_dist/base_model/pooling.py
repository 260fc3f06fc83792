"""Sentence pooling for encoder choice scoring (``seq_cls``).

Hugging Face's BERT-family sequence classifiers read a pooler (dense + tanh) applied to the
[CLS] hidden state. Sentence-transformers checkpoints such as MiniLM-L6 were trained to stand for
a sentence by the masked mean of the last hidden states instead, and ship no pooler weights, so
their [CLS] state carries less of what they learned. ``pooling="mean"`` feeds the pooler's
dense + tanh with that masked mean. The dense layer is the same module under the same name, so
adapters, trainable-module selection, checkpoints and ZeRO-3 partitioning see no difference.
"""

from __future__ import annotations

import torch
from torch import nn

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import POOLINGS


class MaskedMeanPooler(nn.Module):
    """Drop-in for a BERT pooler: ``activation(dense(masked mean of hidden_states))``.

    The pooler is called with the hidden states only, so the attention mask of the current call
    is handed over by a forward pre-hook on the whole model (see :func:`apply_pooling`); with no
    mask every position counts, as the model itself assumes."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.dense = pooler.dense
        self.activation = pooler.activation
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None:
            mean = hidden_states.mean(dim=1)
        else:
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)
            mean = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.activation(self.dense(mean))


def apply_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Set how ``model`` (a BERT-style ``...ForSequenceClassification``) pools; returns it."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling ({pooling!r}) must be one of {', '.join(POOLINGS)}")
    if pooling == "cls":
        return model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None)
    if pooler is None or not isinstance(getattr(pooler, "dense", None), nn.Linear):
        raise ConfigError(f"pooling 'mean' needs a BERT-style pooler (dense + tanh); {type(model).__name__} has none")
    mean_pooler = MaskedMeanPooler(pooler)
    base.pooler = mean_pooler

    def hand_over_mask(_module, args, kwargs):  # BERT's forward(input_ids, attention_mask, ...)
        mean_pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    return model
