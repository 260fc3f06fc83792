"""The LM head and the cross entropy over chunks of tokens, so the [tokens x vocabulary] logits never
exist whole (torchtune's chunked loss, Liger's fused linear cross entropy).

Legend (glossary.py): T tokens (the flattened batch), C tokens of one chunk, D hidden size (the head's input
features), W the vocabulary (the head's rows).

Training (``LinearCrossEntropySum``): one autograd node from the hidden states and the head's weight
to the SUMMED cross entropy of the target tokens. Its forward visits each chunk once and computes the
chunk's loss and, while the chunk's logits are at hand, its gradients (dL/dh for the chunk, dL/dW
accumulated over chunks): the output is a scalar, so the backward only scales them by the incoming
gradient and no logits are recomputed. Ignored targets (-100) are left out before the head runs.
Evaluation (``token_losses``): the per-token losses, chunk by chunk, without autograd.

``ChunkedHead`` puts either into the model's own output embedding (its ``forward`` is replaced on the
instance, the state dict is unchanged): while targets are set, the head returns the loss instead of
logits, so the loss is computed inside the head module's call. That is what makes it work under
ZeRO-3, which gathers a module's weight only around the module's forward and backward. Without
targets the head is the plain linear layer (generation, choice scoring).

Exact where the logits are the plain head's output (no final soft-capping): ``install`` says None
otherwise. Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as the plain
path's ``logits.float()`` does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

IGNORE = -100  # data/examples.py's label of a position without a target (data/ is a floor above)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _logits(h_HD: torch.Tensor, w_WD: torch.Tensor, b_W: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits of one chunk, the matmul in ``dtype``."""
    logits_HW = (h_HD.to(dtype) @ w_WD.to(dtype).t()).float()
    return logits_HW if b_W is None else logits_HW + b_W.float()


def _valid(h_TD: torch.Tensor, target_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = (target_T != IGNORE).nonzero().squeeze(-1)  # NOTE: a device sync (the number of targets)
    return idx, h_TD.index_select(0, idx), target_T.index_select(0, idx)


def token_losses(h_TD, w_WD, b_W, target_T, chunk: int) -> torch.Tensor:
    """Cross entropy of every token [T] (fp32), 0 where the target is IGNORE; no autograd."""
    dtype = _compute_dtype(h_TD)
    with torch.no_grad(), torch.autocast(h_TD.device.type, enabled=False):
        idx, hv, tv = _valid(h_TD, target_T)
        loss_T = torch.zeros(target_T.shape[0], dtype=torch.float32, device=h_TD.device)
        for s in range(0, hv.shape[0], chunk):
            logits_HW = _logits(hv[s:s + chunk], w_WD, b_W, dtype)
            picked = logits_HW.gather(1, tv[s:s + chunk, None]).squeeze(1)
            loss_T[idx[s:s + chunk]] = torch.logsumexp(logits_HW, dim=-1) - picked
    return loss_T


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(W h_t + b, target_t) over the target tokens; see the module docstring."""

    @staticmethod
    def forward(ctx, h_TD, w_WD, b_W, target_T, chunk: int):
        dtype = _compute_dtype(h_TD)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h_TD.device.type, enabled=False):
            idx, hv, tv = _valid(h_TD, target_T)
            total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
            dh = torch.zeros_like(hv) if need_h else None
            dw = torch.zeros(w_WD.shape, dtype=torch.float32, device=w_WD.device) if need_w else None
            db = torch.zeros(w_WD.shape[0], dtype=torch.float32, device=w_WD.device) if need_b else None
            for s in range(0, hv.shape[0], chunk):
                h_HD, t_H = hv[s:s + chunk], tv[s:s + chunk]
                logits_HW = _logits(h_HD, w_WD, b_W, dtype)
                lse_H = torch.logsumexp(logits_HW, dim=-1)
                total += (lse_H - logits_HW.gather(1, t_H[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad_HW = logits_HW.sub_(lse_H[:, None]).exp_()  # softmax, in place of the logits
                grad_HW[torch.arange(t_H.shape[0], device=t_H.device), t_H] -= 1.0
                if db is not None:
                    db += grad_HW.sum(0)
                grad_HW = grad_HW.to(dtype)
                if dh is not None:
                    dh[s:s + chunk] = (grad_HW @ w_WD.to(dtype)).to(dh.dtype)
                if dw is not None:
                    if dtype == torch.float32:
                        dw.addmm_(grad_HW.t(), h_HD.float())  # no [V, D] temporary per chunk
                    else:
                        dw += (grad_HW.t() @ h_HD.to(dtype)).float()
        ctx.shape, ctx.h_dtype = h_TD.shape, h_TD.dtype
        ctx.save_for_backward(idx, dh, dw, db)
        return total

    @staticmethod
    def backward(ctx, g):
        idx, dh, dw, db = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        if dh is not None:
            grad_h = torch.zeros(ctx.shape, dtype=ctx.h_dtype, device=dh.device)
            grad_h.index_copy_(0, idx, dh * g.to(dh.dtype))
        if dw is not None:
            grad_w = dw * g
        if db is not None:
            grad_b = db * g
        return grad_h, grad_w, grad_b, None, None


class ChunkedHead:
    """The chunked loss put into a model's output embedding (see the module docstring)."""

    def __init__(self, head: nn.Linear, chunk_tokens: int) -> None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be positive")
        self.chunk = chunk_tokens
        self.head = head
        self.plain = head.forward
        self._targets: torch.Tensor | None = None
        self._summed = True
        setattr(head, "forward", self.forward)  # on the instance: the module, its hooks and state dict stay

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._targets is None:
            return self.plain(h)
        h_TD, target_T = h.reshape(-1, h.shape[-1]), self._targets.reshape(-1)
        if target_T.shape[0] != h_TD.shape[0]:
            raise ValueError(f"chunked loss: {target_T.shape[0]} targets for {h_TD.shape[0]} hidden states")
        w, b = self.head.weight, self.head.bias
        if self._summed:
            return LinearCrossEntropySum.apply(h_TD, w, b, target_T, self.chunk)
        return token_losses(h_TD, w, b, target_T, self.chunk).view(self._targets.shape)

    @contextmanager
    def loss_of(self, targets: torch.Tensor, summed: bool = True):
        """While inside, the model's ``.logits`` output is the loss of ``targets`` (each position's own
        target, already shifted): the summed loss (a scalar, with gradients), or per token [B, S]
        (``summed=False``, no gradients)."""
        self._targets, self._summed = targets, summed
        try:
            yield
        finally:
            self._targets = None


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's LM head (transformers' ``get_output_embeddings``), None where it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def why_not_chunked(model: nn.Module) -> str | None:
    """Why the chunked loss would not be exact for ``model`` (None: it is)."""
    if not isinstance(output_embeddings(model), nn.Linear):
        return "the model has no linear output embedding (LM head)"
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None:
        return "the model soft-caps its final logits"
    return None


def install(model: nn.Module, chunk_tokens: int) -> ChunkedHead | None:
    """The chunked loss in ``model``'s LM head, or None where it would not be exact (``why_not_chunked``)."""
    head = output_embeddings(model)
    if why_not_chunked(model) is not None or not isinstance(head, nn.Linear):
        return None
    existing = getattr(getattr(head, "forward", None), "__self__", None)
    if isinstance(existing, ChunkedHead):
        return existing
    return ChunkedHead(head, chunk_tokens)
