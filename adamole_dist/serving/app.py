"""The HTTP routes (FastAPI): POST /v1/completions and /v1/chat/completions (a JSON body, or server-sent
events with ``"stream": true``), GET /v1/models, GET /health.

Every error is an OpenAI-style body (errors.py) with its status: 400 for a request that cannot be served as
sent (malformed JSON, an unknown model, a field of the wrong type or out of range, a prompt over
--max_model_len), 401 without the API key (when the server has one), 404/405 for an unknown route or method,
429 when the queue is full, 503 while draining, 500 when generation itself failed. No request stops the
server. A client that leaves (disconnects) cancels its sequences: a stream's generator is cancelled by
the server, a non-streaming request has a task waiting for the disconnect (``cancel_when_gone``)."""

from __future__ import annotations

import asyncio
import hmac
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from adamole_dist.serving.engine import Engine, Pending
from adamole_dist.serving.errors import RequestError, error_body
from adamole_dist.serving.requests import parse_chat, parse_completion
from adamole_dist.serving.responses import Choices, chunk, usage_chunk


class BearerAuth:
    """ASGI middleware: every request must carry ``Authorization: Bearer <key>`` (401 otherwise)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("a valid API key is required: send the header Authorization: Bearer <key>",
                                  "invalid_request_error", None, "invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None


def sse(doc) -> str:
    return f"data: {json.dumps(doc)}\n\n"


async def stream(engine: Engine, pending: Pending):
    """The server-sent events of a streaming request: a chunk per event, the usage, [DONE]."""
    job = pending.job
    choices, started = Choices(job), set()
    try:
        while not choices.complete:
            event = await pending.next_event()
            if event.error is not None:
                engine.counts["failed"] += 1
                yield sse(error_body(event.error, "server_error", None, "generation_failed"))
                break
            before = len(choices.text[event.index])
            logprobs = choices.take(event)
            yield sse(chunk(job, event, logprobs, choices.text[event.index][before:], event.index not in started))
            started.add(event.index)
        else:
            engine.counts["completed"] += 1
            yield sse(usage_chunk(job, choices.usage()))
        yield "data: [DONE]\n\n"
    finally:  # also when the client left: the server cancels this generator
        if not choices.complete:
            pending.cancel()


async def cancel_when_gone(request: Request, pending: Pending) -> None:
    """Wait for the client to disconnect (after its body was read, the server's next message is that), then
    cancel its sequences and wake ``collect`` with None."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    pending.cancel()
    pending.queue.put_nowait(None)


async def collect(engine: Engine, request: Request, pending: Pending) -> dict | None:
    """The whole response of a non-streaming request; None when the client left before it was ready."""
    choices = Choices(pending.job)
    watcher = asyncio.create_task(cancel_when_gone(request, pending))
    try:
        while not choices.complete:
            event = await pending.next_event()
            if event is None:  # the client left
                return None
            if event.error is not None:
                engine.counts["failed"] += 1
                raise RequestError(event.error, code="generation_failed", status=500, kind="server_error")
            choices.take(event)
    finally:
        watcher.cancel()
        if not choices.complete:
            pending.cancel()
    engine.counts["completed"] += 1
    return choices.body()


async def answer(engine: Engine, request: Request, parse):
    if engine.draining:
        raise RequestError("the server is shutting down", code="shutting_down", status=503, kind="server_error")
    job = parse(await read_json(request), engine.models, engine.max_model_len)
    pending = engine.submit(job)
    if job.params.stream:
        return StreamingResponse(stream(engine, pending), media_type="text/event-stream")
    body = await collect(engine, request, pending)
    return JSONResponse(body if body is not None else {})


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code)


def build_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The application; its lifespan starts and stops the engine's scheduler thread."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="adamole-serve", lifespan=lifespan)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.card(engine.base_name) for m in engine.models.values()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(engine, request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(engine, request, parse_chat)

    return app
