"""Multiple-choice accuracy, sharded over ranks.

Under ZeRO-3 every forward gathers parameters collectively, so every rank must run the same
number of forward passes: shards are padded to equal length by repeating an example, and the
repeats are not counted.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch

from .data import Example


@torch.no_grad()
def evaluate_accuracy(
    model,
    task,
    examples: list[Example],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    was_training = model.training
    model.eval()
    per_rank = math.ceil(len(examples) / world_size)
    mine = examples[rank::world_size]
    counted = len(mine)
    mine = mine + [examples[0]] * (per_rank - len(mine))  # equal forwards on every rank
    correct = 0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        preds = task.predict(model, task.eval_batch(chunk))
        for i, (ex, p) in enumerate(zip(chunk, preds.tolist())):
            if start + i < counted:
                correct += int(p == ex.label)
    totals = torch.tensor([float(correct), float(counted)], dtype=torch.float64)
    if all_reduce is not None:
        totals = all_reduce(totals)
    if was_training:
        model.train()
    correct, total = int(totals[0].item()), int(totals[1].item())
    return {"accuracy": correct / max(total, 1), "correct": correct, "total": total}


def majority_class_accuracy(train: list[Example], test: list[Example]) -> float:
    """Accuracy of always answering the most frequent training label (index)."""
    label = Counter(ex.label for ex in train).most_common(1)[0][0]
    return sum(ex.label == label for ex in test) / max(len(test), 1)
