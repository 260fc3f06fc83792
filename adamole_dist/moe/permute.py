"""Permute / unpermute for expert-parallel dispatch. Pure functions, no process group.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

A token goes to another rank j once if any of its kept experts lives on j (deduplicated per
destination), and the receiver computes all of j's L experts for it in one pass and returns one
O-row. The sender's own experts never travel: its share is computed in place on all of its tokens
(their columns of the weights select the pairs), so nothing is copied for it.

What is copied, and when:
* rows out: ``gather_rows`` returns ``x`` itself when the plan sends every token once, in order
  (one remote rank owning an expert of every token, as with 2 ranks and dense routing), else one
  ``index_select`` in plan order;
* routing columns: the weights of the destination's L experts (fp32, exact; -1 marks a pair that
  is not kept) travel beside the rows as their own small tensor, so the rows are never
  concatenated with them;
* combine: the returned rows are added to the local share, ``index_add`` out of place (one copy
  of the local share, no zero fill), or a plain sum when the plan sends every token once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_KEPT = -1.0  # the routing column of a pair that is not kept (weights of kept pairs are >= 0)


# When one other rank needs at least this fraction of the tokens, all of them go to it: x itself is
# sent (no gather, and no zero-filled scatter of its gradient in the backward) for at most 1/0.95 - 1
# = 5 % more rows, which carry no kept expert (their routing columns say so; they return zeros).
# Dense routing over 2 ranks (adamole at tau_max = 1/N) needs >99 % of the tokens on the other rank.
SEND_ALL_FRACTION = 0.95


@dataclass
class DispatchPlan:
    token_S: torch.Tensor  # source token of each sent row, rows grouped by destination
    dest_S: torch.Tensor  # destination rank of each row (non-decreasing)
    send_counts_J: torch.Tensor  # rows per destination (0 for the sender itself when it is excluded)
    needed_counts_J: torch.Tensor  # of those, rows with a kept expert there (the rest pad a send-all)
    num_tokens: int

    def sends_every_token_once(self, send_counts: list[int]) -> bool:
        """True when exactly one destination receives every token, in token order (so the rows are
        ``x`` itself); ``send_counts`` is ``send_counts_J`` on the host (the caller has it for the
        all-to-all split sizes anyway)."""
        busy = [n for n in send_counts if n]
        return len(busy) == 1 and busy[0] == self.num_tokens


def plan_dispatch(kept_TN: torch.Tensor, num_ranks: int, my_rank: int | None = None,
                  send_all_fraction: float | None = None) -> DispatchPlan:
    """Rows to send: token t to rank j once if one of t's kept experts lives on j. ``my_rank``: this
    rank, whose experts are computed in place and get no rows (None: every rank gets rows).
    ``send_all_fraction``: when only one other rank gets rows and it needs at least this fraction
    of the tokens, send it every token (``SEND_ALL_FRACTION``; None: never)."""
    T, N = kept_TN.shape
    if N % num_ranks:
        raise ValueError(f"num_experts ({N}) is not divisible by the EP group size ({num_ranks})")
    send_TJ = kept_TN.view(T, num_ranks, N // num_ranks).any(-1)
    if my_rank is not None:
        send_TJ[:, my_rank] = False
    needed_J = send_TJ.sum(0)
    if send_all_fraction is not None and T:
        busy_J = needed_J > 0
        # decided on the device (no host sync): only one rank gets rows, and it needs nearly all tokens
        send_all = (busy_J.sum() == 1) & (needed_J.max() >= send_all_fraction * T)
        send_TJ = send_TJ | (busy_J & send_all)
    dest_S, token_S = send_TJ.t().nonzero(as_tuple=True)  # sorted by destination, then token
    return DispatchPlan(token_S, dest_S, torch.bincount(dest_S, minlength=num_ranks), needed_J, T)


def local_columns(t_TN: torch.Tensor, my_rank: int, experts_per_rank: int) -> torch.Tensor:
    """The columns of rank ``my_rank``'s experts (a view)."""
    return t_TN[:, my_rank * experts_per_rank : (my_rank + 1) * experts_per_rank]


def gather_rows(x_TD: torch.Tensor, plan: DispatchPlan, every_token_once: bool) -> torch.Tensor:
    """The rows to send, in plan order: ``x`` itself (no copy) when every token goes once, in order."""
    return x_TD if every_token_once else x_TD.index_select(0, plan.token_S)


def routing_columns(weights_TN: torch.Tensor, kept_TN: torch.Tensor, plan: DispatchPlan,
                    num_ranks: int) -> torch.Tensor:
    """[S, L] fp32: each sent row's weights for its destination's L experts, exact, with -1 where
    the pair is not kept (a kept pair's weight is never negative: routing.py). Gradients flow back
    to the kept pairs of ``weights_TN``."""
    L = kept_TN.shape[1] // num_ranks
    cols_SL = plan.dest_S.unsqueeze(1) * L + torch.arange(L, device=kept_TN.device)
    rows_S1 = plan.token_S.unsqueeze(1)
    w_SL = weights_TN.float()[rows_S1, cols_SL]
    return torch.where(kept_TN[rows_S1, cols_SL], w_SL, torch.full_like(w_SL, NOT_KEPT))


def split_routing_columns(cols_VL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights_VL, kept_VL) of received routing columns."""
    kept_VL = cols_VL >= 0
    return torch.where(kept_VL, cols_VL, torch.zeros_like(cols_VL)), kept_VL


def combine(local_TO: torch.Tensor, y_SO: torch.Tensor, plan: DispatchPlan, every_token_once: bool) -> torch.Tensor:
    """The local share plus every returned row added to its token, in fp32 (at least)."""
    dtype = torch.promote_types(torch.promote_types(local_TO.dtype, y_SO.dtype), torch.float32)
    local_TO, y_SO = local_TO.to(dtype), y_SO.to(dtype)
    if every_token_once:
        return local_TO + y_SO
    return local_TO.index_add(0, plan.token_S, y_SO)
