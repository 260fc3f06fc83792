"""The official ``openai`` Python client against a real server (uvicorn on loopback) on a tiny Llama with three
models on one base: chat and completions, streamed and not, each answer what the generation module
(generate_batch, launch/generate.py's path) answers for the same rendered prompt on the same model; usage
counts; n; stop strings; seeded sampling; the prompt log-likelihoods lm-evaluation-harness asks for (echo);
the routing view extension; GET /v1/models."""

from __future__ import annotations

import pytest
import torch

openai = pytest.importorskip("openai", reason="the server's tests need the dev extra: pip install -e '.[dev]'")

from adamole_dist.generation.batched import generate_batch, sampling_options  # noqa: E402
from adamole_dist.generation.prompts import PromptRenderer  # noqa: E402
from adamole_dist.serving.models import load_served_models  # noqa: E402
from tests.helpers.serving import running_server, write_serving_models  # noqa: E402

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    dirs = write_serving_models(tmp_path_factory.mktemp("openai_client"))
    return load_served_models(None, {name: dirs[name] for name in ("adamole", "lora")}, "base", device="cpu")


@pytest.fixture(scope="module")
def server(models):
    with running_server(models) as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def reference(models, name: str, prompt_ids: list[int], max_tokens: int = MAX_TOKENS, routing: bool = False) -> dict:
    """What the generation module answers alone (greedy) for these prompt ids on the served model ``name``."""
    served = models[name]
    [out] = generate_batch(served.model, served.tokenizer, [prompt_ids], sampling_options(max_tokens),
                           adapters=served.adapters, show_routing=routing)
    return out


def chat_ids(models, name: str, content: str) -> list[int]:
    served = models[name]
    return PromptRenderer(served.tokenizer, served.prompt_format).ids({"messages": [{"role": "user",
                                                                                      "content": content}]})


def text_ids(models, name: str, text: str) -> list[int]:
    return PromptRenderer(models[name].tokenizer, "text").ids({"prompt": text})


def test_chat_completion_and_its_stream_answer_as_the_generation_module(client, models):
    ref = reference(models, "adamole", chat_ids(models, "adamole", "name three colours"))
    resp = client.chat.completions.create(model="adamole", max_tokens=MAX_TOKENS, temperature=0,
                                          messages=[{"role": "user", "content": "name three colours"}])
    [choice] = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == ("length" if len(ref["ids"]) == MAX_TOKENS else "stop")
    prompt_len = len(chat_ids(models, "adamole", "name three colours"))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len, len(ref["ids"]))
    assert resp.object == "chat.completion" and resp.model == "adamole"

    chunks = list(client.chat.completions.create(model="adamole", max_tokens=MAX_TOKENS, stream=True,
                                                 messages=[{"role": "user", "content": "name three colours"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["ids"])


def test_completions_of_every_model_on_the_one_base(client, models):
    texts = {}
    for name in ("base", "adamole", "lora"):
        ref = reference(models, name, text_ids(models, name, "the cat sat on"))
        resp = client.completions.create(model=name, prompt="the cat sat on", max_tokens=MAX_TOKENS)
        assert resp.choices[0].text == ref["text"] and resp.usage.completion_tokens == len(ref["ids"])
        streamed = client.completions.create(model=name, prompt="the cat sat on", max_tokens=MAX_TOKENS, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == ref["text"]
        texts[name] = ref["ids"]
    assert texts["base"] != texts["adamole"] and texts["base"] != texts["lora"]  # each adapter acts


def test_several_prompts_and_n_answers(client, models):
    resp = client.completions.create(model="lora", prompt=["hello there", [101, 2023, 2003]], n=2, max_tokens=5)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    first = reference(models, "lora", text_ids(models, "lora", "hello there"), 5)["text"]
    second = reference(models, "lora", [101, 2023, 2003], 5)["text"]
    assert [c.text for c in resp.choices] == [first, first, second, second]  # greedy: n equal answers
    assert resp.usage.prompt_tokens == len(text_ids(models, "lora", "hello there")) + 3


def test_stop_strings_cut_the_text_before_them(client, models):
    ref = reference(models, "lora", text_ids(models, "lora", "one two"), 20)["text"]
    words = ref.split()
    assert len(words) >= 3, ref
    resp = client.completions.create(model="lora", prompt="one two", max_tokens=20, stop=[" " + words[2]])
    assert resp.choices[0].text == ref[: ref.index(" " + words[2])] and resp.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_differs_from_greedy(client):
    def sample(seed):
        return client.completions.create(model="adamole", prompt="a b c", max_tokens=16, temperature=1.5,
                                         seed=seed).choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_echo_logprobs_are_the_prompt_log_likelihoods(client, models):
    ids = [101, 1996, 4937, 2938, 2006]
    resp = client.completions.create(model="adamole", prompt=ids, max_tokens=1, echo=True, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        full = torch.log_softmax(models["adamole"].model(input_ids=torch.tensor([ids])).logits[0], -1)
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(full[pos - 1, ids[pos]]), abs=1e-4)
        assert len(lp.top_logprobs[pos]) == 2 and max(lp.top_logprobs[pos].values()) == pytest.approx(
            float(full[pos - 1].max()), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)
    only = client.completions.create(model="adamole", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert only.usage.completion_tokens == 0 and only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1: len(ids)], abs=1e-6)


def test_chat_logprobs_of_greedy_tokens_are_the_most_likely(client, models):
    resp = client.chat.completions.create(model="adamole", max_tokens=5, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "hi"}])
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens > 0
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob and item.bytes == list(
            item.token.encode())


def test_the_routing_view_is_the_generation_module_s(client, models):
    ids = chat_ids(models, "adamole", "hello")
    ref = reference(models, "adamole", ids, routing=True)
    resp = client.chat.completions.create(model="adamole", max_tokens=MAX_TOKENS, extra_body={"adamole_routing": True},
                                          messages=[{"role": "user", "content": "hello"}])
    routing = resp.choices[0].model_extra["adamole_routing"]
    assert routing == ref["routing"] and len(routing) == len(ref["ids"])
    assert all(len(t["per_layer"]) == len(models["adamole"].adapters.layers) for t in routing)
    with pytest.raises(openai.BadRequestError, match="adamole_routing"):
        client.completions.create(model="lora", prompt="x", max_tokens=2, extra_body={"adamole_routing": True})


def test_models_lists_the_base_and_its_adapters(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "adamole", "lora"}
    assert cards["adamole"].model_extra["adapter"]["method"] == "adamole"
    assert cards["adamole"].model_extra["parent"] == "base" and cards["base"].model_extra["parent"] is None
