"""One served model's continuous batch: the sequences waiting for a slot, the ones running (each a row of
generation/continuous.py's RunningBatch), and the step the scheduler calls: drop the sequences whose
client left, prefill the joiners and give them their first token, then one decode step for every running
row; a finished sequence leaves the batch at once and its slot is free for the next step's joiners.

Joiners are prefilled together (left-padded), except those that want their prompt's log-probabilities
(``echo``: lm-evaluation-harness's log-likelihoods), prefilled one by one for logits at every position of
an unpadded prompt. With the routing view asked by some row, the forward records the experts fired
(adapters/context.py) and each asking row gets its own token's counts per layer."""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext

import torch

from adamole_dist.generation.continuous import RunningBatch, prefill
from adamole_dist.generation.logprobs import prompt_logprobs
from adamole_dist.generation.routing_view import experts_fired
from adamole_dist.serving.models import ServedModel
from adamole_dist.serving.sequence import Sequence


class ModelBatch:
    def __init__(self, served: ServedModel, max_batch_size: int) -> None:
        self.served = served
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []
        self.occupied = 0  # slots taken: rows, and joiners being prefilled (kept by the scheduler's lock)
        self.dropped = 0  # running sequences dropped because their client left
        self.peak = 0  # the most sequences one step has run together
        self.batch = RunningBatch()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def take_joiners(self) -> list[Sequence]:
        """The waiting sequences that fit in the free slots, first come first served (under the lock)."""
        joiners = []
        while self.waiting and self.occupied + len(joiners) < self.max_batch_size:
            seq = self.waiting.popleft()
            if not seq.cancelled:
                joiners.append(seq)
        self.occupied += len(joiners)
        return joiners

    def step(self, joiners: list[Sequence]) -> None:
        staying = [i for i, s in enumerate(self.rows) if not s.cancelled]
        self.dropped += len(self.rows) - len(staying)
        self._keep(staying)
        plain = [s for s in joiners if not s.params.echo]
        for group in ([plain] if plain else []) + [[s] for s in joiners if s.params.echo]:
            self._join(group)
        if self.rows:
            self._decode()

    def _recording(self, seqs: list[Sequence]):
        if self.served.has_experts and any(s.params.routing for s in seqs):
            return self.served.adapters.context.recording_active_experts()
        return nullcontext(None)

    def _fired(self, log) -> torch.Tensor | None:
        """[rows, layers] experts fired for the token each row's last forward predicted, or None."""
        return experts_fired(log, list(self.served.adapters.layers))[:, -1] if log else None

    def _join(self, group: list[Sequence]) -> None:
        echo = group[0].params.echo
        with self._recording(group) as log:
            cache, mask, logits = prefill(self.served.model, [s.prompt for s in group], self.served.pad_id,
                                          all_logits=echo)
        fired = self._fired(log)
        kept = []
        for b, seq in enumerate(group):
            prompt_lp = prompt_logprobs(logits[b], seq.prompt, seq.params.logprobs or 0) if echo else None
            last = logits[b, -1] if echo else logits[b]
            if not seq.advance(last, None if fired is None else fired[b], prompt_lp):
                kept.append(b)
        joined = RunningBatch()
        joined.add(cache, mask)
        joined.keep(kept)
        if kept:
            self.batch.add(joined.cache, joined.mask_BC)
            self.rows += [group[b] for b in kept]
            self.peak = max(self.peak, len(self.rows))

    def _decode(self) -> None:
        with self._recording(self.rows) as log:
            logits = self.batch.step(self.served.model, [s.last_token for s in self.rows])
        fired = self._fired(log)
        self._keep([i for i, s in enumerate(self.rows) if not s.advance(logits[i], None if fired is None
                                                                         else fired[i])])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) < len(self.rows):
            self.batch.keep(rows)
            self.rows = [self.rows[i] for i in rows]

    def fail(self, message: str, joiners: list[Sequence]) -> None:
        """A forward raised: every running and joining sequence ends with the error; the batch starts empty."""
        for seq in self.rows + joiners:
            seq.fail(message)
        self.rows, self.batch = [], RunningBatch()
