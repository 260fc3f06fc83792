"""Evaluation sharded over ranks (routing statistics are merged in by the trainer): multiple-choice
accuracy, and for free-form (SFT) data the held-out loss and perplexity per target token (the greedy
samples beside them are train/held_out.py's).

Under ZeRO-3 every forward gathers parameters collectively, so every rank must run the same
number of forward passes: shards are padded to equal length by repeating an example, and the
repeats are not counted. Each ``task.predict`` call is one forward, so equal shards and equal
batch sizes mean equal forwards.

``stop``, where given, is asked after every batch whether to give up: a collective
the caller makes agree across ranks (the trainer's stop-signal flag), so every rank leaves at the
same batch, raising EvaluationStopped. A preemption warning is shorter than a long evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch

from adamole_dist.data.examples import Example


class EvaluationStopped(Exception):
    """``stop`` answered yes after batch (or sample) ``done`` of ``total``."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"stopped after {done} of {total}")
        self.done, self.total = done, total


def check_stop(stop: Callable[[], bool] | None, done: int, total: int) -> None:
    if stop is not None and done < total and stop():
        raise EvaluationStopped(done, total)


def shard_examples(examples: list[Example], rank: int, world_size: int) -> tuple[list[Example], int]:
    """(this rank's examples padded to the common shard length, how many of them count)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
    mine = list(examples[rank::world_size])
    counted = len(mine)
    per_rank = math.ceil(len(examples) / world_size)
    filler = mine[-1] if mine else (examples[0] if examples else None)
    return mine + [filler] * (per_rank - counted), counted


def _length_proxy(ex: Example) -> int:
    """A stand-in for the padded length of this example's forward (encoder: context and longest
    choice; causal LM: the prompt, which carries the context), for bucketing only."""
    return len(ex.context) + len(ex.prompt) + max(map(len, ex.choice_texts or ex.candidates or [""]))


def count_correct(model, task, shard: list[Example], counted: int, batch_size: int,
                  progress=None, stop=None) -> dict[str, int]:
    """Correct predictions by metric ("acc", and "acc_norm" where the task scores it) among the first
    ``counted`` examples; padding repeats run but don't count.

    Examples run in order of length so a batch pads to similar lengths (on real data this cuts the
    padded tokens by about half); the batches and their number are the same on every rank."""
    order = sorted(range(len(shard)), key=lambda i: _length_proxy(shard[i]))
    correct = {metric: 0 for metric in task.metrics}
    batches = math.ceil(len(order) / batch_size)
    for b, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start : start + batch_size]
        batch = task.eval_batch([shard[i] for i in chunk])
        for metric, preds in task.predictions(model, batch).items():
            correct[metric] += sum(int(p == shard[i].label) for i, p in zip(chunk, preds.tolist()) if i < counted)
        if progress is not None:
            progress(b + 1, batches)
        check_stop(stop, b + 1, batches)
    return correct


@torch.no_grad()
def evaluate_accuracy(
    model,
    task,
    examples: list[Example],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """{"accuracy", "correct", "total"} over all ranks, plus {"acc_norm", "correct_norm"} where the
    task scores length-normalised likelihoods; ``all_reduce`` sums a tensor across ranks
    (its return value is used when it returns a tensor, else the tensor is taken as reduced in place);
    ``progress(batches done, batches)`` is called after every batch, then ``stop`` (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    shard, counted = shard_examples(examples, rank, world_size)
    was_training = model.training
    model.eval()
    try:
        correct = count_correct(model, task, shard, counted, batch_size, progress, stop)
    finally:
        model.train(was_training)
    metrics = sorted(correct)  # the task's metrics: the same on every rank
    totals = torch.tensor([correct[m] for m in metrics] + [counted], dtype=torch.long,
                          device=task.device_for(model))  # NCCL all-reduces GPU tensors only
    if all_reduce is not None:
        reduced = all_reduce(totals)
        totals = reduced if isinstance(reduced, torch.Tensor) else totals
    *hits, total = (int(x) for x in totals.cpu().tolist())
    by_metric = dict(zip(metrics, hits))
    out = {"accuracy": by_metric["acc"] / total if total else 0.0, "correct": by_metric["acc"], "total": total}
    if "acc_norm" in by_metric:
        out.update(acc_norm=by_metric["acc_norm"] / total if total else 0.0, correct_norm=by_metric["acc_norm"])
    return out


def majority_class_accuracy(train_examples: list[Example], test_examples: list[Example]) -> float:
    """Accuracy of always answering the training set's most frequent label index (ties: lowest)."""
    if not train_examples:
        raise ValueError("majority_class_accuracy needs at least one training example")
    counts = Counter(ex.label for ex in train_examples)
    label = min(counts, key=lambda lb: (-counts[lb], lb))
    return sum(ex.label == label for ex in test_examples) / len(test_examples) if test_examples else 0.0


# -- free-form (SFT) data -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(
    model,
    task,
    examples,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """{"eval_loss", "perplexity", "eval_tokens", "total"}: the summed target-token loss over every
    rank's shard divided by the target tokens over every rank (each example once: shard padding
    repeats run but do not count), ``exp`` of it, the tokens and the examples. ``task`` is an
    SFTTask; ``examples`` an indexable sequence of tokenized examples. Batches run shortest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    shard, counted = shard_examples(list(examples), rank, world_size)
    order = sorted(range(len(shard)), key=lambda i: len(shard[i]["input_ids"]))
    loss_sum, tokens = 0.0, 0.0
    was_training = model.training
    model.eval()
    try:
        batches = math.ceil(len(order) / batch_size)
        for b, start in enumerate(range(0, len(order), batch_size)):
            chunk = order[start: start + batch_size]
            sums, counts = task.loss_sums(model, task.eval_batch([shard[i] for i in chunk]))
            keep = torch.tensor([i < counted for i in chunk], dtype=torch.bool)
            loss_sum += float(sums[keep].sum())
            tokens += float(counts[keep].sum())
            if progress is not None:
                progress(b + 1, batches)
            check_stop(stop, b + 1, batches)
    finally:
        model.train(was_training)
    totals = torch.tensor([loss_sum, tokens, float(counted)], dtype=torch.float64, device=task.device_for(model))
    if all_reduce is not None:
        reduced = all_reduce(totals)
        totals = reduced if isinstance(reduced, torch.Tensor) else totals
    loss_sum, tokens, total = totals.cpu().tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan"),
            "eval_tokens": int(tokens), "total": int(total)}
