"""Optimizer for the expert banks, which live outside the DeepSpeed engine.

Why outside: ZeRO-3 partitions every parameter of the engine's module and averages its
gradient over the whole world, which is wrong for experts that differ per rank (expert
parallelism). See docs/zero3_experts.md.

Gradient scaling: every rank's loss is a mean over its own micro batch, and DeepSpeed already
divided it by the accumulation steps. An expert's gradient on its owner sums the
contributions of all tokens routed to it; summing that over the expert-data-parallel group
and dividing by the world size gives the gradient of the mean loss over the global batch,
exactly what DeepSpeed's average gives the replicated parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .parallel import is_single


class ExpertOptimizer:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        max_grad_norm: float,
        lr_lambda,
        world_size: int,
        edp_group=None,
    ) -> None:
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.edp_group = edp_group
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) if params else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda) if params else None
        self.last_grad_norm: float | None = None

    def reduce_gradients(self) -> None:
        """Sum expert grads over the expert-data-parallel group (one flat buffer), / world size."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        if self.world_size > 1 and dist.is_initialized() and not is_single(self.edp_group):
            dist.all_reduce(flat, group=self.edp_group)
        flat.div_(self.world_size)
        for p, g in zip(self.params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g

    def step(self) -> None:
        if self.optimizer is None:
            return
        self.reduce_gradients()
        if self.max_grad_norm > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_step(self, step: int) -> None:
        """Put the lr schedule at optimizer step ``step`` (after a resume)."""
        if self.scheduler is None:
            return
        self.scheduler.last_epoch = step
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * fn(step)

    @property
    def lr(self) -> float | None:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
