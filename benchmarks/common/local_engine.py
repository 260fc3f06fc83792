"""A one-process stand-in for DeepSpeed's engine, so benchmarks/accuracy/accuracy.py trains through the
trainer's own step (adamole_dist/train/step.py) without DeepSpeed: torch AdamW over the given
parameters, gradient clipping over all of them, a LambdaLR schedule, gradient accumulation with
the loss scaled by 1/accumulation as DeepSpeed does."""

from __future__ import annotations

import torch
import torch.nn as nn


class LocalEngine:
    def __init__(self, model: nn.Module, params: list[nn.Parameter], *, lr: float, weight_decay: float,
                 max_grad_norm: float, lr_lambda, gradient_accumulation_steps: int = 1) -> None:
        self.module = model
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.max_grad_norm = max_grad_norm
        self.gas = gradient_accumulation_steps
        self.micro_steps = 0
        self.grad_norm: float | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        """Counts micro batches; at the accumulation boundary: clip, AdamW step, schedule, zero grads."""
        self.micro_steps += 1
        if self.micro_steps % self.gas:
            return
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        self.grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm

    def get_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()
