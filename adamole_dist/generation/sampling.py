"""Choosing next tokens from logits: greedy (the argmax, as ``generate`` picks it) or sampled from the softmax
at a temperature, cut to the smallest set of most likely tokens whose probabilities reach top_p (nucleus).

Two users, one rule. ``launch/generate.py`` samples whole batches through transformers' ``generate`` with one
random stream per prompt (``PerPromptSampler``): ``generate(do_sample=True)`` draws every row from the one
global generator in one ``torch.multinomial`` call, so a prompt's draws depended on how many rows came before
it and the same ``--seed`` gave other samples at another ``--batch_size``. The processor here does the
sampling itself -- temperature, nucleus, one draw per row from that row's own generator seeded from (--seed,
the prompt's index) -- and returns a one-hot score that ``generate`` then takes greedily
(``do_sample=False``, so none of its own warpers or draws run). Padding still changes a batch's float
rounding (about 1e-6 in the logits): a draw within that distance of a boundary between two tokens can still
differ -- rare with the fp32 models here, not the rule. The server's continuous batch (``choose``) picks
one row at a time, each sequence with its own ``Sampling`` (temperature, top_p, generator).

Tensor names (adamole_dist/glossary.py): W vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed range


def prompt_seed(seed: int, index: int) -> int:
    """The generator seed of the prompt at ``index`` under ``--seed``: distinct for every pair."""
    return (seed * GOLDEN + index) % 2**63


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Along the last axis (one row or a batch of rows over the vocabulary): the smallest set of most likely
    tokens whose probability reaches ``top_p`` (at least one), renormalised."""
    if top_p >= 1.0:
        return probs
    ranked, order = probs.sort(dim=-1, descending=True)
    mass_above = ranked.cumsum(-1) - ranked  # the probability of the tokens ranked above each one
    ranked = ranked.masked_fill(mass_above >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return kept / kept.sum(-1, keepdim=True)


class PerPromptSampler:
    """A ``logits_processor`` for ``generate(do_sample=False)``: each row sampled from its own generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0) -> None:
        self.seeds, self.temperature, self.top_p = list(seeds), float(temperature), float(top_p)
        self.generators: list[torch.Generator] | None = None  # made on the scores' device at the first step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = nucleus(torch.softmax(scores.float() / self.temperature, dim=-1), self.top_p)
        picks = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, picks.unsqueeze(1), 0.0)


@dataclass(frozen=True)
class Sampling:
    """How one sequence of a continuous batch picks its tokens: greedy at temperature 0, else sampled
    (``seed``: the draws are reproducible; None: from the process's random state)."""

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
    probs_W = nucleus(torch.softmax(logits_W.float() / sampling.temperature, dim=-1), sampling.top_p)
    return int(torch.multinomial(probs_W, 1, generator=generator))
