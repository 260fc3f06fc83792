"""State shared by all adapted layers of one model during a forward pass.

The model's forward pre-hook stores the attention mask here (for packed rows, which the model
gets without one, the mask passed as ``TOKEN_MASK_KWARG``), so every adapted linear can
tell padding tokens apart without changing the model's code; the layers leave their aux
losses and routing statistics here for the trainer to read after the forward.

Under gradient checkpointing (adapters/checkpointing.py) a block's forward runs again inside the
backward; ``recomputing`` is then true and the layers leave nothing here, so statistics, aux
losses and the balance-bias load count each token once.

Opt-in, for generation (launch/generate.py --show_routing): inside ``recording_active_experts()``
every forward leaves, per adapted layer, how many experts fired at each of its tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from adamole_dist.moe.fused_routing import laid_out


class RoutingContext:
    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        # The layers' load-balancing losses of this forward: a list from eager layers (no operator per layer); a
        # running sum and count from compiled blocks (a list's length is a guard of compiled code: every block
        # would compile again, the next one appending), where the sums fuse into the block's kernels.
        self.aux_losses: list[torch.Tensor] = []
        self.compiled_aux_sum: torch.Tensor | None = None
        self.compiled_aux_terms: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] = {}  # routing_stats.py's layout (the unfused routing)
        self.fused_layers: dict = {}  # name -> layer: the fused routing's statistics sums live on each layer
        # Set by the trainer for aux_loss_scope "global": sum over data-parallel ranks, and their count.
        self.dp_all_reduce = None
        self.dp_world_size = 1
        self.recomputing = False
        # One {layer: experts fired per token (B x S)} per forward while recording; None = off.
        self.active_log: list[dict[str, torch.Tensor]] | None = None
        # Routing statistics per forward (add_stats): off where nobody reads them (a server's decode
        # steps), which saves a third of an adapted layer's small tensor operations.
        self.collect_stats = True

    @contextmanager
    def recomputation(self):
        """Marks a checkpointed block's second forward (in backward): it must not record anything."""
        previous, self.recomputing = self.recomputing, True
        try:
            yield
        finally:
            self.recomputing = previous

    @contextmanager
    def recording_active_experts(self):
        """Within: every model forward appends {layer name: experts fired per token, B x S (0 on
        padding)} to the yielded list, in forward order."""
        previous, self.active_log = self.active_log, []
        try:
            yield self.active_log
        finally:
            self.active_log = previous

    def begin_forward(self, attention_mask: torch.Tensor | None) -> None:
        self.attention_mask = attention_mask
        if attention_mask is not None and self.fused_layers:
            self.move_fused_sums(attention_mask.device)
        self.aux_losses, self.compiled_aux_sum, self.compiled_aux_terms = [], None, None
        if self.active_log is not None:
            self.active_log.append({})

    def record_active(self, name: str, kept_TN: torch.Tensor, valid_T: torch.Tensor | None,
                      leading_shape: torch.Size) -> None:
        """Keep this forward's experts-fired count per token (a no-op unless recording, or when no
        model forward began: a layer called on its own)."""
        if not self.active_log:
            return
        count_T = kept_TN.sum(-1)
        if valid_T is not None:
            count_T = count_T * valid_T
        self.active_log[-1][name] = count_T.view(leading_shape).detach()

    def valid_tokens(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """Flattened bool mask of real tokens for an input of leading shape (B, S), or None.

        With a KV cache the mask covers past + current positions; the current ones are last.
        """
        mask = self.attention_mask
        if mask is None or len(leading_shape) != 2 or mask.dim() != 2:
            return None
        B, S = leading_shape
        if mask.shape[0] != B or mask.shape[1] < S:
            return None
        return mask[:, -S:].reshape(-1).bool()

    def add_aux_loss(self, loss: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.aux_losses.append(loss)
        elif self.compiled_aux_sum is None or self.compiled_aux_terms is None:
            self.compiled_aux_sum = loss
            self.compiled_aux_terms = torch.ones((), dtype=loss.dtype, device=loss.device)
        else:
            self.compiled_aux_sum = self.compiled_aux_sum + loss
            self.compiled_aux_terms = self.compiled_aux_terms + 1

    def aux_sum_and_terms(self) -> tuple[torch.Tensor, torch.Tensor | int] | None:
        """(the sum of this forward's aux losses, how many), or None where no layer left one."""
        total, terms = self.compiled_aux_sum, self.compiled_aux_terms
        if self.aux_losses:
            eager = torch.stack(self.aux_losses).sum() if len(self.aux_losses) > 1 else self.aux_losses[0]
            total = eager if total is None else total + eager
            terms = len(self.aux_losses) if terms is None else terms + len(self.aux_losses)
        return None if total is None or terms is None else (total, terms)

    def take_aux_loss(self) -> torch.Tensor:
        """The sum of the aux losses left since the last forward began or the last take (a CPU zero where none
        was: it adds to a loss on any device), and forget them: for a layer run outside a model forward
        (benchmarks, calibration), where no forward clears them."""
        summed = self.aux_sum_and_terms()
        self.aux_losses, self.compiled_aux_sum, self.compiled_aux_terms = [], None, None
        return summed[0] if summed is not None else torch.zeros(())

    def balance_over_data_parallel(self, all_reduce, world_size: int) -> None:
        """aux_loss_scope "global": each layer's balance loss sums its routing counts over the
        data-parallel ranks with ``all_reduce`` (in place) and divides by ``world_size`` of them."""
        self.dp_all_reduce, self.dp_world_size = all_reduce, world_size

    def add_stats(self, name: str, stats: torch.Tensor) -> None:
        """Accumulate a layer's routing statistics (routing_stats.py's layout), in float64 on the device."""
        if name in self._stats:
            self._stats[name] += stats
        else:
            self._stats[name] = stats.to(torch.float64, copy=True)

    def register_fused_layer(self, name: str, layer) -> None:
        """A layer routing through moe/fused_routing.py: its statistics sums (``layer.routing_sums_U``, a
        tensor of its own) are read, laid out, here."""
        self.fused_layers[name] = layer

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Every layer's statistics since the last pop, in routing_stats.py's layout (float64, on the device;
        a fused layer that saw no token since has zeros: summaries skip it)."""
        fused = {name: laid_out(layer.routing_sums_U, layer.fused_rules[False])
                 for name, layer in self.fused_layers.items() if layer.fused_rules is not None}
        return {**self._stats, **fused}

    def pop_stats(self) -> dict[str, torch.Tensor]:
        stats = self.stats
        self._stats = {}
        for layer in self.fused_layers.values():
            layer.routing_sums_U.zero_()  # in place: a compiled block keeps reading the same tensor
        return stats

    def move_fused_sums(self, device: torch.device) -> None:
        """Keep every fused layer's statistics sums on ``device`` (the model's inputs'): they live outside
        the module tree, so ``model.to()`` does not move them."""
        for layer in self.fused_layers.values():
            if layer.routing_sums_U.device != device:
                object.__setattr__(layer, "routing_sums_U", layer.routing_sums_U.to(device))
