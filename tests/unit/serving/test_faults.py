"""The server under bad input and misbehaving clients (a real server on loopback, httpx and raw sockets):
malformed JSON, unknown models, fields of the wrong type or range, prompts over --max_model_len, unknown
routes each get an OpenAI-style error body naming the field, and the server keeps serving; a full queue
answers 429; a client that leaves mid-stream, or before its non-streaming answer, frees its slot for the next
request at once; with --api_key every request needs the bearer token."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the server's tests need the dev extra: pip install -e '.[dev]'")

from adamole_dist.serving.models import load_served_models  # noqa: E402
from tests.helpers.serving import running_server, write_serving_models  # noqa: E402

LONG = {"model": "adamole", "prompt": "go on", "max_tokens": 1900, "ignore_eos": True}  # runs until cancelled


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    dirs = write_serving_models(tmp_path_factory.mktemp("faults"))
    return load_served_models(None, {"adamole": dirs["adamole"]}, "base", device="cpu")


def poll(check, what: str, polls: int = 1200):
    """Wait (at most ``polls`` x 0.05 s) until ``check()`` is true."""
    for _ in range(polls):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(models):
    with running_server(models, max_model_len=64) as (url, _), httpx.Client(base_url=url) as http:
        raw = http.post("/v1/completions", content=b'{"model": "adamole", "prompt": ', headers={
            "Content-Type": "application/json"})
        assert error_of(raw)["code"] == "invalid_json"
        assert error_of(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}))["param"] == "model"
        for field, value in [("temperature", "warm"), ("max_tokens", 2.5), ("top_p", 7), ("n", 0), ("stop", {})]:
            error = error_of(http.post("/v1/completions", json={"model": "adamole", "prompt": "x", field: value}))
            assert error["param"] == field and field in error["message"]
        long = error_of(http.post("/v1/completions", json={"model": "adamole", "prompt": "word " * 70}))
        assert long["param"] == "prompt" and "64" in long["message"] and long["code"] == "context_length_exceeded"
        chat = error_of(http.post("/v1/chat/completions", json={"model": "base", "messages": [
            {"role": "user", "content": "hi"}]}))
        assert chat["param"] == "messages" and "chat template" in chat["message"]
        assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
        assert error_of(http.get("/v1/completions"), 405)["code"] == "method_not_allowed"
        ok = http.post("/v1/completions", json={"model": "adamole", "prompt": "still there", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(models):
    with running_server(models, max_batch_size=1, max_queue=1) as (url, engine), httpx.Client(base_url=url,
                                                                                            timeout=120) as http:
        first = http.stream("POST", "/v1/completions", json={**LONG, "stream": True})
        response = first.__enter__()
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")  # running
        second: dict = {}

        def queued():
            body = {"model": "adamole", "prompt": "after", "max_tokens": 4, "ignore_eos": True}
            second["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=120)

        waiter = threading.Thread(target=queued)
        waiter.start()
        poll(lambda: engine.health()["waiting"] == 1, "the second request waits")
        refused = http.post("/v1/completions", json={"model": "adamole", "prompt": "third", "max_tokens": 2})
        assert error_of(refused, 429)["code"] == "queue_full"
        first.__exit__(None, None, None)  # the streaming client leaves mid-stream
        waiter.join(120)
        assert second["response"].status_code == 200
        assert second["response"].json()["usage"]["completion_tokens"] == 4
        health = engine.health()
        assert health["cancelled"] == 1 and health["running"] == health["waiting"] == 0
        assert health["requests"]["refused"] == 1


def test_a_non_streaming_client_that_leaves_is_cancelled(models):
    with running_server(models) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(LONG).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            poll(lambda: engine.health()["running"] == 1, "the request runs")
        poll(lambda: engine.health()["running"] == 0, "the request was dropped")
        assert engine.health()["cancelled"] == 1 and engine.health()["requests"].get("completed", 0) == 0


def test_an_api_key_guards_every_route(models):
    with running_server(models, api_key="s3cret") as (url, _), httpx.Client(base_url=url) as http:
        assert error_of(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert error_of(http.get("/health", headers={"Authorization": "Bearer wrong"}), 401)["code"] == \
            "invalid_api_key"
        good = {"Authorization": "Bearer s3cret"}
        assert http.get("/v1/models", headers=good).status_code == 200
        done = http.post("/v1/completions", headers=good, json={"model": "base", "prompt": "hi", "max_tokens": 2})
        assert done.status_code == 200
