"""Gradient (activation) checkpointing for adapted Hugging Face models.

Each transformer block keeps only its input in the forward and runs again in the backward to
rebuild its activations (torch.utils.checkpoint, non-reentrant: the outputs of a block that
feed the aux loss and the task loss backpropagate through the same replay). Memory for
activations drops from every block's intermediates to one block's, for about one extra forward.

The replay must not record twice: the checkpoint function below marks every call after the first
as a recomputation (RoutingContext.recomputing), and the adapted layers then skip their aux
losses, routing statistics and balance-bias loads. Dropout replays its masks (the checkpoint
restores the RNG state), so the routing decisions and gradients are those of the plain forward.
ZeRO-3 gathers the base weights again in the replay through its own module hooks.
"""

from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from adamole_dist.adapters.context import RoutingContext
from adamole_dist.config.fields import ConfigError


def replay_marking_checkpoint(context: RoutingContext):
    """A checkpoint function (the signature of torch.utils.checkpoint.checkpoint) whose second and
    later calls of the wrapped function run under ``context.recomputation()``."""

    def checkpoint_fn(function, *args, **kwargs):
        calls = 0

        def run(*a, **k):
            nonlocal calls
            calls += 1
            if calls == 1:
                return function(*a, **k)
            with context.recomputation():
                return function(*a, **k)

        kwargs.pop("use_reentrant", None)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpoint_fn


def enable_gradient_checkpointing(model: nn.Module, context: RoutingContext) -> int:
    """Checkpoints every block of a Hugging Face ``model`` with the replay-marking function; returns
    the number of checkpointed blocks. The KV cache is turned off (it cannot be replayed)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not blocks:
        raise ConfigError(f"gradient_checkpointing: found no checkpointable blocks in {type(model).__name__}")
    fn = replay_marking_checkpoint(context)
    for block in blocks:
        block._gradient_checkpointing_func = fn  # the hook transformers' blocks call (its checkpoint by default)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return len(blocks)
