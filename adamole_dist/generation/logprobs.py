"""The log-probabilities an API reports: the chosen token's, the most likely alternatives', and a prompt's own
tokens' (its log-likelihood). They are the model's own (before temperature and top_p), as OpenAI's API
reports them.

Tensor names (adamole_dist/glossary.py): W vocabulary, C a prompt's positions."""

from __future__ import annotations

import torch


def top_logprobs(logprobs_W: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens and their log-probabilities, most likely first."""
    if k <= 0:
        return []
    values, ids = logprobs_W.topk(min(k, logprobs_W.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def token_logprob(logits_W: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(the chosen token's log-probability, the ``k`` most likely alternatives)."""
    logprobs_W = torch.log_softmax(logits_W.float(), dim=-1)
    return float(logprobs_W[token]), top_logprobs(logprobs_W, k)


def prompt_logprobs(logits_CW: torch.Tensor, ids: list[int], k: int) -> list[tuple[float | None, list]]:
    """Per prompt token, its log-probability given the tokens before it and the ``k`` most likely there;
    the first token has none (nothing predicts it): (None, [])."""
    logprobs_CW = torch.log_softmax(logits_CW[: len(ids) - 1].float(), dim=-1)  # position i predicts i + 1
    out: list[tuple[float | None, list]] = [(None, [])]
    if len(ids) > 1:
        chosen = logprobs_CW.gather(-1, torch.tensor(ids[1:], device=logprobs_CW.device).view(-1, 1)).view(-1)
        for row, lp in zip(logprobs_CW, chosen.tolist()):
            out.append((lp, top_logprobs(row, k)))
    return out
