"""The causal-LM losses gpu_check trains with: random tokens (shapes are what count), every position but the last
a target, through transformers' own head and loss (the full logits) or through the chunked head."""

from __future__ import annotations

import torch

from adamole_dist.data.examples import IGNORE


class RandomTokensLM:
    """transformers' own head and loss: the full [tokens x vocabulary] logits."""

    def loss(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["input_ids"]).loss


class ChunkedRandomTokensLM:
    """The same loss through the chunked head (base_model/chunked_loss.py, the trainer's default)."""

    def __init__(self, head) -> None:
        self.head = head

    def loss(self, model, batch):
        ids = batch["input_ids"]
        targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE)], dim=1)
        with self.head.loss_of(targets):
            total = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        return total / (ids.shape[0] * (ids.shape[1] - 1))
