"""Request bodies checked into jobs (serving/requests.py, fields.py): prompts rendered as training rendered them
(chat template of the adapter, Alpaca for an Alpaca adapter, the text after BOS for completions, token ids
as given), defaults, and every bad field refused with a RequestError that names it."""

from __future__ import annotations

import pytest

from adamole_dist.generation.prompts import PromptRenderer
from adamole_dist.serving.errors import RequestError
from adamole_dist.serving.models import load_served_models
from adamole_dist.serving.requests import parse_chat, parse_completion
from tests.helpers.saved_adapters import write_adapter_dir
from tests.helpers.serving import write_serving_models

LIMIT = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    dirs = write_serving_models(root, max_positions=128)
    alpaca = write_adapter_dir(root / "alpaca", dirs["base"], "lora", meta={"prompt_format": "alpaca"})
    return load_served_models(None, {"adamole": dirs["adamole"], "lora": dirs["lora"], "alpaca": alpaca}, "base",
                              device="cpu")


def completion(models, **body):
    return parse_completion({"model": "lora", "prompt": "hello", **body}, models, LIMIT)


def chat(models, **body):
    return parse_chat({"model": "adamole", "messages": [{"role": "user", "content": "hi"}], **body}, models, LIMIT)


def test_prompts_render_as_training_rendered_them(models):
    tok = models["adamole"].tokenizer
    job = chat(models, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tok.decode(job.prompts[0]) == "user : hi [SEP] assistant :"  # the adapter's own chat template
    alpaca = parse_chat({"model": "alpaca", "messages": [{"role": "user", "content": "name a colour"}]}, models,
                        LIMIT)
    assert alpaca.prompts == [PromptRenderer(models["alpaca"].tokenizer, "alpaca").ids({"prompt": "name a colour"})]
    job = completion(models, prompt=["the cat", [101, 7592]])
    assert models["lora"].tokenizer.decode(job.prompts[0]) == "[CLS] the cat" and job.prompts[1] == [101, 7592]
    assert completion(models, prompt=[101, 7592]).prompts == [[101, 7592]]  # one prompt of token ids


def test_defaults(models):
    job = completion(models)
    p = job.params
    assert (p.max_tokens, p.sampling.temperature, p.n, p.logprobs, p.echo, p.stream, p.stop) == \
        (16, 0.0, 1, None, False, False, [])
    assert chat(models).params.max_tokens == LIMIT - len(chat(models).prompts[0])  # what fits
    assert completion(models, prompt=[101] * 60).params.max_tokens == 4  # the default shrinks to fit
    assert chat(models, logprobs=True, top_logprobs=3).params.logprobs == 3
    assert completion(models, stop="\n").params.stop == ["\n"]


@pytest.mark.parametrize("body, param, words", [
    ({"model": None}, "model", "required"),
    ({"model": "gpt-4"}, "model", "not served here"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": 2.5}, "temperature", "[0.0, 2.0]"),
    ({"top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"max_tokens": True}, "max_tokens", "must be an integer"),
    ({"max_tokens": -1}, "max_tokens", ">= 0"),
    ({"max_tokens": 0}, "max_tokens", "only with echo"),
    ({"max_tokens": 63}, "max_tokens", "--max_model_len"),
    ({"prompt": "word " * 80}, "prompt", "--max_model_len"),
    ({"n": 17}, "n", "[1, 16]"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": 3}, "stop", "string or an array of strings"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
    ({"echo": "yes"}, "echo", "true or false"),
    ({"prompt": [101, -5]}, "prompt", "token ids"),
    ({"prompt": [[101], 7]}, "prompt", "token ids"),
    ({"prompt": []}, "prompt", "non-empty"),
    ({"prompt": None}, "prompt", "required"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"adamole_routing": True}, "adamole_routing", "no experts"),
])
def test_bad_completion_fields_are_named(models, body, param, words):
    with pytest.raises(RequestError) as e:
        completion(models, **body)
    assert e.value.param == param and e.value.status == 400 and words in e.value.message
    assert e.value.body()["error"]["param"] == param


@pytest.mark.parametrize("model, body, param, words", [
    ("adamole", {"messages": []}, "messages", "non-empty array"),
    ("adamole", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", "role"),
    ("adamole", {"messages": [{"role": "user", "content": 5}]}, "messages[0]", "string or an array"),
    ("adamole", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]", "text parts"),
    ("base", {}, "messages", "need a chat template"),  # the tiny base has none; the adamole adapter brought one
    ("alpaca", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}]}, "messages", "one user message"),
    ("adamole", {"max_tokens": 0}, "max_tokens", ">= 1"),
    ("adamole", {"response_format": {"type": "json_object"}}, "response_format", "only"),
    ("adamole", {"top_logprobs": 30, "logprobs": True}, "top_logprobs", "[0, 20]"),
])
def test_bad_chat_fields_are_named(models, model, body, param, words):
    with pytest.raises(RequestError) as e:
        parse_chat({"model": model, "messages": [{"role": "user", "content": "hi"}], **body}, models, LIMIT)
    assert e.value.param == param and words in e.value.message


def test_a_body_that_is_no_object_is_refused():
    with pytest.raises(RequestError, match="must be a JSON object, got an array"):
        parse_completion([1, 2], {}, LIMIT)
