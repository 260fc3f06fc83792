"""Choosing a sequence's next token from its logits, one row at a time (each sequence of a continuous batch
has its own temperature, top_p and random generator), and the log-probabilities an API reports: the
chosen token's, the most likely alternatives', and a prompt's own tokens' (its log-likelihood).

Greedy (temperature 0) is the argmax, as ``generate`` picks it; sampling draws from the softmax at the
temperature, cut to the smallest set of most likely tokens whose probabilities reach top_p (nucleus).
Log-probabilities are the model's own (before temperature and top_p), as OpenAI's API reports them.

Tensor names (adamole_dist/glossary.py): W vocabulary, C a prompt's positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens: greedy at temperature 0, else sampled (``seed``: the draws are
    reproducible; None: from the process's random state)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        if self.temperature == 0 or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def choose(logits_W: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """The next token of one sequence."""
    if sampling.temperature == 0:
        return int(logits_W.argmax())
    probs_W = torch.softmax(logits_W.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_W, order_W = probs_W.sort(descending=True)
        before_W = sorted_W.cumsum(-1) - sorted_W  # probability mass of the more likely tokens
        sorted_W = sorted_W.masked_fill(before_W >= sampling.top_p, 0.0)  # the first token always stays
        probs_W = torch.zeros_like(probs_W).scatter_(0, order_W, sorted_W)
    return int(torch.multinomial(probs_W, 1, generator=generator))


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
