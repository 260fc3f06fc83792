"""Sixteen simultaneous clients (the ``openai`` client, one thread each) against a real server: requests of
different prompt lengths and reply lengths join and leave the running batch at different steps, yet each
greedy answer is token for token the answer the same request gets alone; several steps did batch rows
together. Then the same with the clients spread over three models of one base (a batch per model, taken
in turn)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the server's tests need the dev extra: pip install -e '.[dev]'")

from adamole_dist.serving.models import load_served_models  # noqa: E402
from tests.helpers.serving import running_server, write_serving_models  # noqa: E402

WORDS = "the cat sat on a mat while one dog ran far away from home and the sun rose".split()
CLIENTS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    dirs = write_serving_models(tmp_path_factory.mktemp("concurrency"))
    return load_served_models(None, {name: dirs[name] for name in ("adamole", "lora", "mole_topk")}, "base",
                              device="cpu")


def requests_for(models_cycle: list[str]) -> list[dict]:
    """Request k: a prompt of 1 + k % 7 words, 6 + (5 * k) % 11 new tokens, model models_cycle[k % len]."""
    return [{"model": models_cycle[k % len(models_cycle)], "prompt": " ".join(WORDS[k % 5: k % 5 + 1 + k % 7]),
             "max_tokens": 6 + (5 * k) % 11, "temperature": 0} for k in range(CLIENTS)]


def ask(client, request: dict) -> tuple[str, int, str]:
    choice = client.completions.create(**request)
    return choice.choices[0].text, choice.usage.completion_tokens, choice.choices[0].finish_reason


@pytest.mark.parametrize("models_cycle", [["adamole"], ["adamole", "lora", "mole_topk", "base"]],
                         ids=["one_adapter", "mixed_models"])
def test_sixteen_simultaneous_clients_get_their_single_request_answers(models, models_cycle):
    requests = requests_for(models_cycle)
    with running_server(models) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        alone = [ask(client, r) for r in requests]  # one at a time
        assert engine.health()["peak_batch"] == 1
        with ThreadPoolExecutor(CLIENTS) as pool:
            together = list(pool.map(lambda r: ask(client, r), requests))
        health = engine.health()
    assert together == alone
    assert health["peak_batch"] > 1 and health["requests"]["completed"] == 2 * CLIENTS
    assert health["running"] == health["waiting"] == 0
    assert len({text for text, _, _ in alone}) > CLIENTS // 2  # the requests differ
