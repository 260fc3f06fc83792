"""Wrap the target layers of a Hugging Face model (nn.Linear, GPT-2's Conv1D: adapters/targets.py) with adapters.

ZeRO-3 aware: a partitioned weight's full shape is read from ``ds_shape`` (its ``.shape`` is
the empty local shard), and nothing is gathered. The base model is frozen; only adapter
parameters (and the task head named in ``trainable_modules``) train.
"""

from __future__ import annotations

import torch.nn as nn

from adamole_dist.adapters.context import RoutingContext
from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.layer import AdaptedLinear
from adamole_dist.adapters.targets import default_targets, find_target_modules, matches, resolved_names, weight_shape
from adamole_dist.base_model.quantize import float_dtype
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.model_kwargs import TOKEN_MASK_KWARG
from adamole_dist.moe.experts import ExpertBank
from adamole_dist.parallel.local_dispatcher import Dispatcher, LocalDispatcher


def adapt_linear(
    base: nn.Module,
    cfg: AdapterConfig,
    *,
    name: str = "linear",
    context: RoutingContext | None = None,
    dispatcher: Dispatcher | None = None,
    expert_slice: tuple[int, int] | None = None,
) -> AdaptedLinear:
    """One AdaptedLinear around ``base`` (its expert bank created for MoE methods)."""
    out_f, in_f = weight_shape(base)
    first, count = expert_slice or (0, cfg.num_experts)
    bank = None
    if cfg.is_moe:
        bank = ExpertBank(
            count, cfg.rank, in_f, out_f, cfg.scaling,
            first_expert=first, total_experts=cfg.num_experts, device=base.weight.device, dtype=float_dtype(base),
        )
    layer = AdaptedLinear(
        base, cfg, name=name, in_features=in_f, out_features=out_f,
        context=context or RoutingContext(), dispatcher=dispatcher or LocalDispatcher(), experts=bank,
    )
    layer.train(base.training)  # new modules follow the model's mode (dropout off in an eval model)
    if bank is not None:
        bank.train(base.training)
    return layer


def _begin_forward_hook(context: RoutingContext):
    def hook(module, args, kwargs):
        if TOKEN_MASK_KWARG in kwargs:  # packed rows: the model itself must not see this kwarg
            kwargs = dict(kwargs)
            context.begin_forward(kwargs.pop(TOKEN_MASK_KWARG))
            return args, kwargs
        context.begin_forward(kwargs.get("attention_mask"))

    return hook


def inject_adapters(
    model: nn.Module,
    cfg: AdapterConfig,
    *,
    trainable_modules: list[str] | tuple[str, ...] = (),
    dispatcher: Dispatcher | None = None,
    expert_slice: tuple[int, int] | None = None,
) -> Adapters:
    """Replace each target layer by an AdaptedLinear, freeze the rest; return the handle.

    ``expert_slice = (first, count)`` places experts [first, first + count) on this rank
    (expert parallelism); default: all of them.
    """
    targets = cfg.target_modules or default_targets(model)
    found = find_target_modules(model, targets)
    first, count = expert_slice or (0, cfg.num_experts)
    dispatcher = dispatcher or LocalDispatcher()
    context = RoutingContext()
    for p in model.parameters():
        p.requires_grad_(False)

    layers: dict[str, AdaptedLinear] = {}
    for name, base in found:
        layer = adapt_linear(base, cfg, name=name, context=context, dispatcher=dispatcher, expert_slice=(first, count))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[name] = layer

    for name, module in model.named_modules():
        if any(matches(name, t) for t in trainable_modules):
            for p in module.parameters():
                p.requires_grad_(True)
    missing = [t for t in trainable_modules if not any(matches(n, t) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"trainable_modules: {', '.join(map(repr, missing))} matched no module of this model")
    model.register_forward_pre_hook(_begin_forward_hook(context), with_kwargs=True)
    return Adapters(model, cfg, layers, context, list(trainable_modules), targets=resolved_names(list(layers)))
