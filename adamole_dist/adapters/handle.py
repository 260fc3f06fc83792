"""The handle over what ``inject_adapters`` put into one model: its adapted layers, the expert
banks that live outside the model (and outside DeepSpeed's engine), the shared routing context,
and what a training step asks of them (aux loss, parameter groups, the balance-bias update)."""

from __future__ import annotations

import torch
import torch.nn as nn

from adamole_dist.adapters.context import RoutingContext
from adamole_dist.adapters.layer import AdaptedLinear
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.moe.experts import ExpertBank


class Adapters:
    """Handle to the adapters injected into one model: layers, experts, shared context."""

    def __init__(
        self,
        model: nn.Module,
        cfg: AdapterConfig,
        layers: dict[str, AdaptedLinear],
        context: RoutingContext,
        trainable_modules: list[str],
        targets: list[str] | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.layers = layers
        self.context = context
        self.trainable_modules = trainable_modules
        # The adapted modules as target names (targets.resolved_names): what a default or a shorthand chose.
        self.targets = targets if targets is not None else sorted(layers)
        self.expert_banks: dict[str, ExpertBank] = {
            name: layer.experts for name, layer in layers.items() if cfg.is_moe
        }
        # A container for .to()/.parameters() of the banks; deliberately not part of `model`.
        self.expert_module = nn.ModuleList(self.expert_banks.values())

    def aux_loss(self) -> torch.Tensor | None:
        """Combined (unscaled) load-balancing loss of the last forward, or None."""
        summed = self.context.aux_sum_and_terms()
        if summed is None:
            return None
        total, terms = summed
        return total / terms if self.cfg.aux_loss_reduce == "mean" else total

    def engine_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters registered on the model (routers, LoRA, task head): data parallel."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.expert_module.parameters())

    def routers(self) -> dict[str, torch.nn.Module]:
        return {name: layer.router for name, layer in self.layers.items() if layer.router is not None}

    def update_balance_bias(self, all_reduce=None) -> None:
        """Aux-loss-free balancing, after an optimizer step: one all-reduce of every layer's load."""
        routers = [r for r in self.routers().values() if r.selection_bias is not None]
        if not routers:
            return
        loads = torch.stack([r.routed_load for r in routers])
        if all_reduce is not None:
            loads = all_reduce(loads)
        for router, load in zip(routers, loads):
            router.update_bias(load)

    def register_experts(self) -> None:
        """For inference: every expert bank becomes a child module of its layer (AdaptedLinear.
        register_experts), so the model's ``.to()``, ``.half()`` and ``state_dict()`` carry them.
        Not for training under DeepSpeed (docs/zero3_experts.md)."""
        for layer in self.layers.values():
            layer.register_experts()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.expert_module.train(mode)
