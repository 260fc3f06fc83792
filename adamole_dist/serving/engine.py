"""Between the HTTP handlers (asyncio, the server's event loop) and the scheduler thread: a job becomes its
sequences (one per prompt and answer, ``n`` per prompt), queued with the scheduler; their events come back
into an asyncio queue of the request (the scheduler thread hands them over with
``loop.call_soon_threadsafe``), and ``Pending.cancel`` tells the scheduler the client left.

The engine also keeps the server's counters for GET /health: requests completed, failed, refused (queue
full), and sequences cancelled (their client left before they ended)."""

from __future__ import annotations

import asyncio
from collections import Counter

from adamole_dist.serving.errors import QueueFull
from adamole_dist.serving.models import ServedModel
from adamole_dist.serving.requests import Job
from adamole_dist.serving.scheduler import Scheduler
from adamole_dist.serving.sequence import Event, Sequence


class Pending:
    """A submitted job: its events as they come (``next_event``), and ``cancel``."""

    def __init__(self, job: Job, seqs: list[Sequence], queue: asyncio.Queue, scheduler: Scheduler) -> None:
        self.job, self.seqs, self.queue, self.scheduler = job, seqs, queue, scheduler

    async def next_event(self) -> Event | None:
        """The next event of any of its choices (None: the client left, see app.py)."""
        return await self.queue.get()

    def cancel(self) -> None:
        self.scheduler.cancel(self.seqs)


class Engine:
    def __init__(self, models: dict[str, ServedModel], base_name: str, *, max_batch_size: int, max_queue: int,
                 max_model_len: int) -> None:
        self.models, self.base_name, self.max_model_len = models, base_name, max_model_len
        self.scheduler = Scheduler(models, max_batch_size, max_queue)
        self.counts: Counter[str] = Counter()
        self.draining = False

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def submit(self, job: Job) -> Pending:
        """Queue the job (QueueFull when it does not fit: the caller answers 429)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: Event) -> None:  # called on the scheduler thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        n = job.params.n
        seqs = [Sequence(job, i * n + j, prompt, deliver) for i, prompt in enumerate(job.prompts) for j in range(n)]
        try:
            self.scheduler.submit(seqs)
        except QueueFull:
            self.counts["refused"] += 1
            raise
        return Pending(job, seqs, queue, self.scheduler)

    def health(self) -> dict:
        return {"status": "draining" if self.draining else "ok", "models": list(self.models),
                **self.scheduler.status(), "requests": dict(self.counts)}
