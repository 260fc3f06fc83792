"""The task of free-form (SFT) data: tokenized examples {"input_ids", "labels"} -> batches, the
per-token loss and held-out token losses (greedy samples are generation/'s).

Batches come from data/batching.py: a list of examples is padded (one example per row), a list of
packed rows (each a list of examples, ``PackedRows``) is packed. ``model_inputs`` says what the
model is called with (packed rows: position ids and no 2-D mask).

Loss normalisation: the loss of an optimizer step is the summed cross entropy of its target
tokens divided by the number of target tokens of the WHOLE step -- every micro batch on every
rank -- so W ranks give the same loss and gradients as one process on the same global batch, and
a long example weighs by its tokens, not by the batch it fell in. ``prepare_step`` counts the
step's target tokens from the CPU labels (no device sync) in one ``sum_over_ranks`` (the caller's
collective)
and stamps each micro batch with its denominator ``N / (W * A)`` (N target tokens of the step, W
ranks, A micro batches): DeepSpeed's backward divides every micro loss by A and averages the
gradients over W (the expert optimizer divides its sum by W the same way), which leaves
``sum / N``. A micro loss is then ``W * A * sum_micro / N``: its mean over the micro batches,
averaged over ranks (the trainer's log line), is the step's per-token loss. A batch that did not
go through ``prepare_step`` (benchmarks, one-off calls) is normalised by its own target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adamole_dist.data.batching import collate_packed, collate_padded, model_inputs
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.task import SumOverRanks, Task, one_process_sum

DENOMINATOR = "loss_denominator"  # batch key set by prepare_step (a float: not moved to a device)
TARGETS = "target_tokens"  # batch key: this batch's target tokens (counted from the CPU labels)


class PackedRows(Sequence):
    """Examples grouped into packed rows: item i is the list of the examples of row i."""

    def __init__(self, examples: Sequence[dict], rows: list[list[int]]) -> None:
        self.examples = examples
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.examples[j] for j in self.rows[i]]


def target_count(labels: torch.Tensor) -> int:
    """Target tokens of a batch: the shifted labels (the first position is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())


class SFTTask(Task):
    """Causal-LM training on tokenized free-form examples (see the module docstring)."""

    decoder = True
    metrics = ()  # no choices to score: evaluation is held-out loss (data/evaluate.py evaluate_loss)

    def __init__(self, tokenizer, max_length: int, device=None, autocast: str = "none") -> None:
        super().__init__(tokenizer, max_length, device, autocast)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token  # padding never counts: labels and masks say so
        self.pad_id = tokenizer.pad_token_id

    # -- training ----------------------------------------------------------------------------------
    def collate(self, items: list) -> dict:
        """A padded batch of examples, or a packed batch of rows (lists of examples)."""
        if items and isinstance(items[0], list):
            batch = collate_packed(items, self.pad_id, self.max_length)
        else:
            batch = collate_padded(items, self.pad_id)
        batch[TARGETS] = target_count(batch["labels"])
        return batch

    def prepare_step(self, micro_batches: list[dict], world_size: int,
                     sum_over_ranks: SumOverRanks | None = None) -> None:
        """Stamp each micro batch with the step's loss denominator (one ``sum_over_ranks``, host numbers;
        it must be given for more than one rank)."""
        if sum_over_ranks is None:
            if world_size > 1:
                raise ValueError(f"prepare_step: world_size {world_size} needs sum_over_ranks (a collective)")
            sum_over_ranks = one_process_sum
        (total,) = sum_over_ranks([float(sum(b[TARGETS] for b in micro_batches))])
        denominator = max(total, 1.0) / (world_size * len(micro_batches))
        for b in micro_batches:
            b[DENOMINATOR] = denominator

    def token_losses(self, model, batch: dict) -> torch.Tensor:
        """Cross entropy of every shifted position [B, S-1], 0 where the label is IGNORE."""
        b = self.to_device(batch, self.device_for(model))
        if self.chunked_head is not None and not torch.is_grad_enabled():
            return self.chunked_loss(model, b, model_inputs(b), summed=False)
        logits = self.forward(model, **model_inputs(b)).logits
        labels = b["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="none")
        return loss.view(labels.shape)

    def loss(self, model, batch: dict) -> torch.Tensor:
        denominator = batch.get(DENOMINATOR) or max(batch.get(TARGETS, target_count(batch["labels"])), 1)
        if self.chunked_head is not None:
            b = self.to_device(batch, self.device_for(model))
            return self.chunked_loss(model, b, model_inputs(b)) / denominator
        return self.token_losses(model, batch).sum() / denominator

    # -- evaluation --------------------------------------------------------------------------------
    def eval_batch(self, examples: list[dict]) -> dict:
        """Evaluation is always padded (one example per row): per-example sums are then row sums."""
        return collate_padded(examples, self.pad_id)

    @torch.no_grad()
    def loss_sums(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed target-token loss per row [B], target tokens per row [B]), CPU float64."""
        losses = self.token_losses(model, batch).double().sum(-1).cpu()
        counts = (batch["labels"][:, 1:] != IGNORE).sum(-1).double()
        return losses, counts
