"""One choice being generated: its prompt, how it picks tokens, the text so far, when it ends, and the events
it hands its request (one per step it took part in; the last one carries the finish reason).

A sequence ends at a stop token (the model's and tokenizer's eos, generation/stops.py; not with
``ignore_eos``), a stop string (the text ends before it), max_tokens ("length"), or when its client left
(``cancelled``: the scheduler drops it from the batch at its next step). The stop token is neither in the
text nor counted among the completion tokens, as ``adamole-generate`` counts them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from adamole_dist.generation.incremental_text import IncrementalText
from adamole_dist.generation.logprobs import token_logprob
from adamole_dist.generation.routing_view import token_routing
from adamole_dist.generation.sampling import Sampling, choose


@dataclass
class Event:
    """What one step brought a choice: new text, per new token (id, log-probability, top alternatives) when
    asked, the routing view of the new token when asked; the prompt's log-probabilities (echo) on the first
    event; on the last, the finish reason (or an error) and the count of completion tokens."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    routing: list[dict] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Sequence:
    def __init__(self, job, index: int, prompt: list[int], deliver: Callable[[Event], None]) -> None:
        self.job, self.index, self.prompt, self.deliver = job, index, prompt, deliver
        self.params = job.params
        served = job.model
        self.tokenizer = served.tokenizer
        self.stops = [] if self.params.ignore_eos else served.stops
        sampling = self.params.sampling
        if sampling.seed is not None and self.params.n > 1:  # n answers to one seeded request: n different draws
            sampling = Sampling(sampling.temperature, sampling.top_p, sampling.seed + index % self.params.n)
        self.sampling = sampling
        self.generator = sampling.generator(next(served.model.parameters()).device)
        self.text = IncrementalText(self.tokenizer, self.params.stop)
        self.generated: list[int] = []
        self.last_token: int | None = None
        self.cancelled = False
        self.finished = False

    @property
    def model_name(self) -> str:
        return self.job.model.name

    def advance(self, logits_W: torch.Tensor, fired: torch.Tensor | None = None,
                prompt_logprobs: list | None = None) -> bool:
        """Choose the next token from ``logits_W`` and hand the event out; True when the sequence ended.
        ``fired``: experts fired per adapted layer for this token (the routing view)."""
        event = Event(self.index, prompt_logprobs=prompt_logprobs)
        if self.params.max_tokens == 0:  # echo only: the prompt's log-probabilities
            return self._finish(event, "length")
        token = choose(logits_W, self.sampling, self.generator)
        if token in self.stops:
            return self._finish(event, "stop")
        self.generated.append(token)
        self.last_token = token
        event.tokens = [token]
        event.text = self.text.push(token)
        if self.params.logprobs is not None:
            logprob, top = token_logprob(logits_W, token, self.params.logprobs)
            event.logprobs = [(token, logprob, top)]
        if self.params.routing and fired is not None:
            event.routing = token_routing(self.tokenizer, [token], fired.view(1, -1))
        if self.text.stopped:
            return self._finish(event, "stop")
        if len(self.generated) >= self.params.max_tokens:
            return self._finish(event, "length")
        self.deliver(event)
        return False

    def _finish(self, event: Event, reason: str) -> bool:
        event.text += self.text.flush()
        event.finish_reason = reason
        event.completion_tokens = len(self.generated)
        self.finished = True
        self.deliver(event)
        return True

    def fail(self, message: str) -> None:
        """End with an error (a forward that raised, the server stopping)."""
        if not self.finished:
            self.finished = True
            self.deliver(Event(self.index, error=message, completion_tokens=len(self.generated)))
