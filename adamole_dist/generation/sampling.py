"""Sampling with one random stream per prompt, so ``--seed`` gives a prompt the same completion whatever
the batch it lands in.

transformers' ``generate(do_sample=True)`` draws every row of a batch from the one global generator, in
one ``torch.multinomial`` call: a prompt's draws depend on how many rows came before it, so the same
seed gave other samples at another ``--batch_size``. Here a logits processor does the sampling itself --
temperature, then nucleus (top_p), then one draw per row from that row's own generator, seeded from
(--seed, the prompt's index) -- and returns a one-hot score, which ``generate`` then takes greedily
(``do_sample=False``, so none of its own warpers or draws run).

What remains: padding changes a batch's float rounding (about 1e-6 in the logits), so a draw that falls
within that distance of a boundary between two tokens can still differ; with the fp32 models here that
is rare, not the rule.
"""

from __future__ import annotations

import torch

GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed range


def prompt_seed(seed: int, index: int) -> int:
    """The generator seed of the prompt at ``index`` under ``--seed``: distinct for every pair."""
    return (seed * GOLDEN + index) % 2**63


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


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row (batch x vocabulary): the smallest set of most likely tokens whose probability reaches
    ``top_p`` (at least one), renormalised."""
    if top_p >= 1.0:
        return probs
    ranked, order = probs.sort(dim=-1, descending=True)
    mass_above = ranked.cumsum(-1) - ranked  # the probability of the tokens ranked above each one
    ranked = ranked.masked_fill(mass_above >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return kept / kept.sum(-1, keepdim=True)
