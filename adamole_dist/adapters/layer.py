"""The adapted linear: base_layer(x) + the weighted delta of its LoRA experts.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

The adapter wraps the original module (``self.base_layer``) instead of subclassing it, so
any nn.Linear (ZeRO-3 partitioned, quantized or not) and GPT-2's Conv1D are adapted the same way: the
forward calls the base layer, and only its shape is read (adapters/targets.py knows Conv1D's transposed
weight). For MoE methods the
expert bank is held *outside* the module tree (see docs/zero3_experts.md): ZeRO-3 never
partitions or averages it, and the expert optimizer owns it. For inference
``register_experts`` puts it into the tree (adapters/pretrained.py does). The single LoRA of method
``lora`` and the routers are ordinary (data-parallel) submodules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from adamole_dist.adapters.context import RoutingContext
from adamole_dist.base_model.quantize import float_dtype
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.moe.balance import global_load_balancing_loss, load_balancing_loss
from adamole_dist.moe.experts import DENSE_ONLY_TOTAL_RANK, ExpertBank, dense_delta_from_projection
from adamole_dist.moe.fused_routing import RoutingRule, fused_rule
from adamole_dist.moe.routing import Router, build_router, renormalize
from adamole_dist.moe.routing_stats import routing_stats
from adamole_dist.parallel.local_dispatcher import Dispatcher, LocalDispatcher


class AdaptedLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        cfg: AdapterConfig,
        *,
        name: str,
        in_features: int,
        out_features: int,
        context: RoutingContext,
        dispatcher: Dispatcher | None = None,
        experts: ExpertBank | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cfg = cfg
        self.in_features = in_features
        self.out_features = out_features
        # Shared, non-module state: kept out of the module tree on purpose.
        object.__setattr__(self, "adapter_name", name)
        object.__setattr__(self, "context", context)
        object.__setattr__(self, "dispatcher", dispatcher)
        w = base_layer.weight
        dtype = float_dtype(base_layer)  # a quantized base stores codes: the adapter computes in its compute dtype
        if cfg.is_moe:
            if experts is None or dispatcher is None:
                raise ValueError(f"{name}: MoE method {cfg.method!r} needs an expert bank and a dispatcher")
            self.router: Router | None = build_router(cfg, in_features, device=w.device, dtype=dtype)
            # The routing in one autograd node where it covers the config (moe/fused_routing.py): per mode
            # (training computes the aux loss); None where the unfused chain is needed.
            self.fused_rules: dict[bool, RoutingRule] | None = fused_rule(cfg)
            if self.fused_rules is not None:  # its statistics sums: a tensor outside the module tree (no dtype casts)
                object.__setattr__(self, "routing_sums_U", torch.zeros(
                    self.fused_rules[False].stat_columns, dtype=torch.float64, device=w.device))
                context.register_fused_layer(name, self)
            object.__setattr__(self, "experts", experts)  # NOT registered: outside ZeRO (docs/zero3_experts.md)
            # Every expert on this rank, always on the dense path: the experts' first matmul can be the router's.
            self.dense_here = type(dispatcher) is LocalDispatcher and (
                cfg.compute_path == "dense"
                or (cfg.compute_path == "auto" and experts.num_experts * experts.rank <= DENSE_ONLY_TOTAL_RANK))
            self.lora = None
        else:
            self.router = None
            self.fused_rules = None
            self.dense_here = False
            self.lora = ExpertBank(1, cfg.rank, in_features, out_features, cfg.scaling, device=w.device, dtype=dtype)

    def register_experts(self) -> None:
        """For inference: make the expert bank a child module, so ``.to()``, ``.half()``, ``.eval()``
        and ``state_dict()`` of the model include it. Training keeps it out of the module tree
        (docs/zero3_experts.md); idempotent, and nothing to do for lora."""
        bank = self.__dict__.pop("experts", None)
        if bank is not None:
            self.add_module("experts", bank)

    def extra_repr(self) -> str:
        n = self.cfg.num_experts
        return (f"method={self.cfg.method}, in={self.in_features}, out={self.out_features}, experts={n}, "
                f"r={self.cfg.rank}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.delta(x).view(out.shape).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution (T x O) for input x (..., D): routing, experts, combine."""
        x_TD = x.reshape(-1, self.in_features)
        x_drop_TD = F.dropout(x_TD, p=self.cfg.dropout, training=self.training)
        if self.lora is not None:
            return self.lora(x_drop_TD)  # a module call: ZeRO-3 gathers the factors (experts.py)
        valid_T = self.context.valid_tokens(x.shape[:-1])
        if self.reads_x_once(x_TD):
            weights_TN, kept_TN, h_TK = self.route_fused(x_TD, valid_T, self.experts.a_rows())
        else:
            (weights_TN, kept_TN), h_TK = self.route(x_TD, valid_T), None
        if self.context.active_log is not None and not self.context.recomputing:
            self.context.record_active(self.adapter_name, kept_TN, valid_T, x.shape[:-1])
        if h_TK is not None:
            return dense_delta_from_projection(h_TK, weights_TN, self.experts.lora_B, self.experts.scaling)
        return self.dispatcher(x_drop_TD, weights_TN, kept_TN, self.experts, self.cfg.compute_path)

    def reads_x_once(self, x_TD: torch.Tensor) -> bool:
        """Whether the router and the experts' A take x in one matmul against their stacked rows (the
        router's ``fused_logits``): where both read the same x (no dropout active), the fused routing
        applies, every expert is on this rank and on the dense path, in one dtype. Else the experts read
        x again (a second pass over the biggest tensor forward, and a second gradient for it backward)."""
        return (self.dense_here and self.uses_fused_routing() and (self.cfg.dropout == 0 or not self.training)
                and self.experts.lora_A.dtype == x_TD.dtype == self.router.gate_weight.dtype)

    def uses_fused_routing(self) -> bool:
        return self.fused_rules is not None and (self.context.dp_all_reduce is None
                                                 or self.cfg.aux_loss_scope != "global")

    def route(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router, padding exclusion, capacity, aux loss and statistics -> (weights_TN, kept_TN)."""
        if self.uses_fused_routing():
            weights_TN, kept_TN, _ = self.route_fused(x_TD, valid_T)
            return weights_TN, kept_TN
        cfg = self.cfg
        r = self.router.route(x_TD)
        if valid_T is None:
            valid_T = torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
        routed_TN = r.mask_TN if cfg.route_padding else r.mask_TN & valid_T.unsqueeze(-1)
        kept_TN = self.dispatcher.capacity_keep(routed_TN, r.probs_TN, cfg.effective_capacity_factor, cfg.drop_policy)
        if kept_TN is routed_TN:  # nothing dropped
            weights_TN = r.weights_TN if cfg.route_padding else r.weights_TN * valid_T.unsqueeze(-1)
        elif cfg.renormalize_after_drop:
            weights_TN = renormalize(r.scores_TN, kept_TN)
        else:
            weights_TN = r.weights_TN * kept_TN
        # A checkpointed block's replay in backward (adapters/checkpointing.py) computes the same
        # tensors (the checkpoint matches them one by one) but records nothing a second time.
        record = not self.context.recomputing
        if self.training and cfg.aux_loss_coeff > 0:
            aux = self.aux_loss(r, routed_TN, valid_T)
            if record:
                self.context.add_aux_loss(aux)
        if record and self.training and cfg.balance_bias_rate > 0:
            self.router.routed_load += routed_TN.sum(0).to(self.router.routed_load.dtype)
        if record and self.context.collect_stats:
            self.context.add_stats(self.adapter_name, routing_stats(kept_TN, routed_TN, weights_TN, valid_T, r.tau_T))
        return weights_TN, kept_TN

    def route_fused(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None, a_rows: torch.Tensor | None = None):
        """``route`` in one autograd node (moe/fused_routing.py): no capacity, no balance bias, a local aux loss.
        (weights_TN, kept_TN, x's projection by ``a_rows`` from the router's own matmul, or None)."""
        count_T = None if valid_T is None or self.cfg.route_padding else valid_T.to(torch.float32)
        rule = self.fused_rules[self.training]
        weights_TN, aux, kept_TN, stat_sums, h_TK = self.router(x_TD, fused=(rule, valid_T, count_T, a_rows))
        if not self.context.recomputing:  # a checkpointed block's replay records nothing a second time
            if aux is not None:
                self.context.add_aux_loss(aux)
            if self.context.collect_stats:
                self.routing_sums_U.add_(stat_sums)
        return weights_TN, kept_TN, h_TK

    def aux_loss(self, r, routed_TN: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
        cfg, ctx = self.cfg, self.context
        count_T = torch.ones_like(r.probs_TN[:, 0]) if cfg.route_padding else valid_T.to(r.probs_TN.dtype)
        if cfg.aux_loss_scope == "global" and ctx.dp_all_reduce is not None:
            return global_load_balancing_loss(r.probs_TN, routed_TN, count_T, cfg.aux_loss_variant, r.tau_T,
                                              ctx.dp_all_reduce, ctx.dp_world_size)
        return load_balancing_loss(r.probs_TN, routed_TN, count_T, cfg.aux_loss_variant, r.tau_T)

