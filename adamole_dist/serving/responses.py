"""The bodies OpenAI's API answers with, built from a job's events (sequence.py ``Event``): the whole
response of a non-streaming request (``Choices`` gathers the events, then ``body``), or one chunk per
event for server-sent events (``chunk``), and the usage every response carries: prompt tokens (each
prompt counted once, whatever n), completion tokens (stop tokens not counted), their total.

Log-probabilities: completions in the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token text: log-probability}, ``text_offset``; with ``echo`` the prompt's tokens first, the very first
one without a log-probability: null), chat in the current one (``content``: per token its text, bytes,
log-probability and ``top_logprobs``). The routing view, when asked, is each choice's ``adamole_routing``:
per generated token {"token", "mean_active", "per_layer"} (generation/routing_view.py)."""

from __future__ import annotations

from adamole_dist.serving.requests import Job
from adamole_dist.serving.sequence import Event


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


class LogprobsLegacy:
    """The completions ``logprobs`` object of one choice, grown event by event."""

    def __init__(self) -> None:
        self.offset = 0
        self.doc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, tokenizer, entries: list[tuple[int, float | None, list]], first_is_unscored: bool = False) -> dict:
        """Append these tokens; their part alone (for a stream chunk)."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, (token, logprob, top) in enumerate(entries):
            text = _token_text(tokenizer, token)
            unscored = first_is_unscored and k == 0
            part["tokens"].append(text)
            part["token_logprobs"].append(None if unscored else logprob)
            part["top_logprobs"].append(None if unscored else {_token_text(tokenizer, t): lp for t, lp in top})
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for key in self.doc:
            self.doc[key] += part[key]
        return part


def chat_logprobs(tokenizer, entries: list[tuple[int, float, list]]) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]} for t, lp, top in entries]}


class Choices:
    """Every choice of one job, gathered from its events (a stream formats each event as it comes)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        count = len(job.prompts) * job.params.n
        self.text = [""] * count
        self.finish = [None] * count
        self.completion_tokens = [0] * count
        self.routing: list[list[dict]] = [[] for _ in range(count)]
        self.logprob_entries: list[list] = [[] for _ in range(count)]
        self.legacy = [LogprobsLegacy() for _ in range(count)]
        self.done = 0

    def prompt_of(self, index: int) -> list[int]:
        return self.job.prompts[index // self.job.params.n]

    def take(self, event: Event) -> dict | None:
        """Record an event; the log-probabilities it adds in the response's shape (None when not asked)."""
        i, job = event.index, self.job
        tokenizer = job.model.tokenizer
        if event.prompt_logprobs is not None and job.params.echo:
            self.text[i] += tokenizer.decode(self.prompt_of(i), skip_special_tokens=True)
        self.text[i] += event.text
        self.routing[i] += event.routing
        if event.finish_reason is not None:
            self.finish[i], self.completion_tokens[i] = event.finish_reason, event.completion_tokens
            self.done += 1
        if job.params.logprobs is None:
            return None
        if job.kind == "chat":
            self.logprob_entries[i] += event.logprobs
            return chat_logprobs(tokenizer, event.logprobs)
        part = {}
        if event.prompt_logprobs is not None:
            prompt = [(t, lp, top) for t, (lp, top) in zip(self.prompt_of(i), event.prompt_logprobs)]
            part = self.legacy[i].add(tokenizer, prompt, first_is_unscored=True)
        more = self.legacy[i].add(tokenizer, event.logprobs)
        return {k: part.get(k, []) + more[k] for k in more}

    @property
    def complete(self) -> bool:
        return self.done == len(self.text)

    def usage(self) -> dict:
        prompt = sum(map(len, self.job.prompts))
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def choice(self, i: int) -> dict:
        job = self.job
        out: dict = {"index": i, "finish_reason": self.finish[i], "logprobs": None}
        if job.kind == "chat":
            out["message"] = {"role": "assistant", "content": self.text[i]}
            if job.params.logprobs is not None:
                out["logprobs"] = chat_logprobs(job.model.tokenizer, self.logprob_entries[i])
        else:
            out["text"] = self.text[i]
            if job.params.logprobs is not None:
                out["logprobs"] = self.legacy[i].doc
        if job.params.routing:
            out["adamole_routing"] = self.routing[i]
        return out

    def body(self) -> dict:
        """The whole non-streaming response."""
        return {**header(self.job, streaming=False), "choices": [self.choice(i) for i in range(len(self.text))],
                "usage": self.usage()}


def header(job: Job, streaming: bool) -> dict:
    chat = job.kind == "chat"
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "object": kind, "created": job.created,
            "model": job.model.name}


def chunk(job: Job, event: Event, logprobs: dict | None, text: str, first: bool) -> dict:
    """One server-sent event's body for ``event`` (``text``: what it adds; ``first``: the choice's first
    chunk, which names the role in chat)."""
    choice: dict = {"index": event.index, "finish_reason": event.finish_reason, "logprobs": logprobs}
    if job.kind == "chat":
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    if job.params.routing:
        choice["adamole_routing"] = event.routing
    return {**header(job, streaming=True), "choices": [choice]}


def usage_chunk(job: Job, usage: dict) -> dict:
    """The stream's last chunk: no choices, the usage (as OpenAI sends it with include_usage)."""
    return {**header(job, streaming=True), "choices": [], "usage": usage}
