"""Head warm-up before fine-tuning (linear probing, then fine-tuning: "LP-FT").

The choice-scoring head (the pooler's dense + tanh, then a 1-logit classifier) starts random. On a
task whose signal is weak — BoolQ without its passage — a few hundred noisy steps of joint
fine-tuning never move it off the label prior. Fitting the head first, full batch, on the frozen
model's pooler inputs gives every method the same starting head for its seed; the adapters then
fine-tune from it. The adapters start as the identity (every LoRA B is zero), so the frozen
model's features are exactly what the injected model computes at step 0 and one extraction per
dataset serves every method and seed.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


class HeadInputs:
    """The pooler's dense-layer inputs for every (example, choice) pair: ``feats`` [Q, C, D],
    ``choice_mask`` [Q, C] (False at padded choices) and ``labels`` [Q]."""

    def __init__(self, feats: torch.Tensor, choice_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.feats, self.choice_mask, self.labels = feats, choice_mask, labels

    def subset(self, index: torch.Tensor) -> "HeadInputs":
        return HeadInputs(self.feats[index], self.choice_mask[index], self.labels[index])


def pooler_of(model) -> torch.nn.Module:
    """The BERT-style pooler (dense + activation), [CLS] or mean-pooling alike."""
    return getattr(model, model.base_model_prefix).pooler


@torch.no_grad()
def extract_head_inputs(model, task, examples: list, batch_size: int) -> HeadInputs:
    """Run the model (eval mode) over ``task.collate`` batches of ``examples`` and keep what
    enters the pooler's dense layer (the [CLS] state or the masked mean, per the pooling)."""
    captured: list[torch.Tensor] = []
    handle = pooler_of(model).dense.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    width = max(len(ex.choice_texts) for ex in examples)
    feats, masks, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = task.collate(examples[start : start + batch_size])
            task.scores(model, batch)
            mask = batch["choice_mask"]
            f = captured.pop().view(*mask.shape, -1)
            pad = width - mask.shape[1]
            feats.append(F.pad(f, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad), value=False))
            labels.append(batch["labels"])
    finally:
        handle.remove()
        model.train(was_training)
    return HeadInputs(torch.cat(feats), torch.cat(masks), torch.cat(labels))


def head_scores(model, feats: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
    """[Q, C] scores of the model's head on pooler inputs, -inf at padded choices."""
    pooler = pooler_of(model)
    pooled = pooler.activation(pooler.dense(feats))
    return model.classifier(pooled).squeeze(-1).masked_fill(~choice_mask, float("-inf"))


def fit_head(model, inputs: HeadInputs, epochs: int, lr: float, after_epoch=None) -> float:
    """Full-batch AdamW on the head's parameters (pooler dense + classifier); returns the last loss.
    Draws no random numbers, so the adapters' data order and dropout that follow are the same as
    without the warm-up for a given seed. ``after_epoch(epoch)`` is called after each update."""
    params = list(pooler_of(model).dense.parameters()) + list(model.classifier.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))  # epochs = 0
    for epoch in range(epochs):
        loss = F.cross_entropy(head_scores(model, inputs.feats, inputs.choice_mask), inputs.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_epoch is not None:
            after_epoch(epoch + 1)
    opt.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def head_accuracy(model, inputs: HeadInputs) -> float:
    predicted = head_scores(model, inputs.feats, inputs.choice_mask).argmax(-1)
    return float((predicted == inputs.labels).float().mean())


def validation_curve(make_model, inputs: HeadInputs, seeds: list[int], checkpoints: list[int], lr: float,
                     fraction: float = 0.2) -> dict[int, list[float]]:
    """Held-out accuracy of the warm-up head after each number of epochs in ``checkpoints``, per
    seed: a fixed ``fraction`` of the training split (shuffle seed 0) is held out, the head is fit
    on the rest. How the warm-up's epoch count is chosen without looking at the test split."""
    order = list(range(len(inputs.labels)))
    random.Random(0).shuffle(order)
    cut = int(len(order) * fraction)
    held_out, rest = inputs.subset(torch.tensor(order[:cut])), inputs.subset(torch.tensor(order[cut:]))
    curve: dict[int, list[float]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_model()

        def record(epoch: int) -> None:
            if epoch in checkpoints:
                curve.setdefault(epoch, []).append(head_accuracy(model, held_out))

        fit_head(model, rest, max(checkpoints), lr, after_epoch=record)
    return curve
