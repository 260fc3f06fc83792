"""The scheduler: one thread runs every model forward (one at a time: on a CPU the cores are shared anyway,
and a model is not to be called from two threads), fed by the HTTP handlers through ``submit``.

Each served model has its own continuous batch (model_batch.py); a batch holds one model's sequences only
(adapters are injected per model copy, so a forward runs one adapter). When several models have work, the
scheduler takes them in turn, one step each (round robin), so no adapter starves the others. Within a
model, a sequence joins at the next step when a slot (--max_batch_size) is free, and leaves the step it
ends. Beyond the free slots, at most --max_queue sequences wait; a request that would exceed that is
refused at once (QueueFull: HTTP 429) rather than queued without bound.

Cancelling (the client left) marks the sequences; waiting ones leave the queue at once, running ones
leave their batch at the start of the next step."""

from __future__ import annotations

import logging
import threading

import torch

from adamole_dist.serving.errors import QueueFull
from adamole_dist.serving.model_batch import ModelBatch
from adamole_dist.serving.models import ServedModel
from adamole_dist.serving.sequence import Sequence

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, models: dict[str, ServedModel], max_batch_size: int, max_queue: int) -> None:
        self.batches = {name: ModelBatch(m, max_batch_size) for name, m in models.items()}
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.cond = threading.Condition()
        self.stopping = False
        self.cancelled_waiting = 0
        self._turn = 0
        self.thread = threading.Thread(target=self._loop, name="adamole-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current step; sequences still waiting or running end with an error."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _overflow(self) -> int:
        """Sequences waiting beyond the free slots of their model."""
        return sum(max(0, len(b.waiting) - (self.max_batch_size - b.occupied)) for b in self.batches.values())

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (all of one model), or QueueFull when they do not fit."""
        with self.cond:
            if self.stopping:
                raise QueueFull(self.max_queue)
            batch = self.batches[seqs[0].model_name]
            batch.waiting.extend(seqs)
            if self._overflow() > self.max_queue:
                for _ in seqs:
                    batch.waiting.pop()
                raise QueueFull(self.max_queue)
            self.cond.notify_all()

    def cancel(self, seqs: list[Sequence]) -> None:
        """The client left: its sequences stop at the next step (waiting ones leave the queue now)."""
        with self.cond:
            for seq in seqs:
                if seq.finished or seq.cancelled:
                    continue
                seq.cancelled = True
                waiting = self.batches[seq.model_name].waiting
                if seq in waiting:
                    waiting.remove(seq)
                    self.cancelled_waiting += 1
            self.cond.notify_all()

    def status(self) -> dict:
        with self.cond:
            return {"running": sum(not s.finished for b in self.batches.values() for s in b.rows),
                    "waiting": sum(len(b.waiting) for b in self.batches.values()),
                    "cancelled": self.cancelled_waiting + sum(b.dropped for b in self.batches.values()),
                    "peak_batch": max(b.peak for b in self.batches.values())}

    def _next(self) -> tuple[ModelBatch, list[Sequence]] | None:
        """(the next model with work, round robin; its joiners), waiting for work; None when stopping."""
        with self.cond:
            while not self.stopping and not any(b.busy for b in self.batches.values()):
                self.cond.wait()
            if self.stopping:
                return None
            order = list(self.batches.values())
            for k in range(len(order)):
                batch = order[(self._turn + k) % len(order)]
                if batch.busy:
                    self._turn = (self._turn + k + 1) % len(order)
                    return batch, batch.take_joiners()
        return None

    def _loop(self) -> None:
        while (work := self._next()) is not None:
            batch, joiners = work
            try:
                with torch.inference_mode():
                    batch.step(joiners)
            except Exception as e:  # a failed forward fails its batch's requests, never the server
                log.exception("model %s: a batch step failed", batch.served.name)
                batch.fail(f"generation failed: {type(e).__name__}: {e}", joiners)
            with self.cond:
                batch.occupied = len(batch.rows)
        with self.cond:
            for batch in self.batches.values():
                batch.fail("the server is shutting down", list(batch.waiting))
                batch.waiting.clear()
