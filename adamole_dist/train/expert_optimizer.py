"""Optimizer for the expert banks, which live outside the DeepSpeed engine.

Why outside: ZeRO-3 partitions every parameter of the engine's module and averages its
gradient over the whole world, which is wrong for experts that differ per rank (expert
parallelism). See docs/zero3_experts.md.

Gradient scaling: every rank's loss is a mean over its own micro batch, and DeepSpeed already
divided it by the accumulation steps. An expert's gradient on its owner sums the
contributions of all tokens routed to it; summing that over the expert-data-parallel group
and dividing by the world size gives the gradient of the mean loss over the global batch,
exactly what DeepSpeed's average gives the replicated parameters.

Clipping: the expert banks are clipped by the norm of ALL experts' gradients (every layer,
all N experts): each rank's shard norm squared, summed over its expert-parallel group, which
holds each expert exactly once (replicas in other EP groups hold identical gradients after
the reduction and are not counted again). So the update is the one a single process makes,
at every world and ep_size. The engine's parameters (routers, LoRA, task head) are clipped by
DeepSpeed with their own global norm: two norms, each layout independent (README).
"""

from __future__ import annotations

import math

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from adamole_dist.parallel import collectives
from adamole_dist.parallel.layout import is_single


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
        ep_group=None,
    ) -> None:
        """``edp_group``: ranks holding the same experts (None = the whole world); ``ep_group``:
        the ranks that together hold every expert once (None = this rank holds them all)."""
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.edp_group = edp_group
        self.ep_group = ep_group
        self.optimizer = (torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
                          if params else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda) if params else None

    def reduce_gradients(self) -> torch.Tensor | None:
        """Sum expert grads over the expert-data-parallel group (one flat buffer), / world size.
        Returns that buffer; every ``p.grad`` is a view into it."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not grads:
            return None
        flat = _flatten_dense_tensors(grads)
        if self.world_size > 1 and not is_single(self.edp_group):
            collectives.all_reduce_sum(flat, group=self.edp_group)
        flat.div_(self.world_size)
        for p, g in zip(self.params, _unflatten_dense_tensors(flat, grads)):
            p.grad = g
        return flat

    def global_grad_norm(self, flat: torch.Tensor) -> float:
        """L2 norm of every expert's gradient (``flat``: this rank's), each expert counted once
        (collective over the EP group)."""
        sq = flat.float().pow(2).sum().reshape(1)
        if self.ep_group is not None:
            collectives.all_reduce_sum(sq, group=self.ep_group)
        return math.sqrt(sq.item())  # NOTE: device sync

    def step(self) -> float | None:
        """Reduce, measure, clip, update. Returns the expert gradient norm (before clipping); a
        non-finite norm skips the update (the trainer then stops the run)."""
        if self.optimizer is None:
            return None
        flat = self.reduce_gradients()
        norm = self.global_grad_norm(flat)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        if self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1.0:
                flat.mul_(coef)  # the grads are views of it
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

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
