"""A request body checked into a ``Job``: the model it picks, its prompts as token ids, and how to generate.

Prompts of POST /v1/chat/completions render exactly as training rendered them (generation/prompts.py): the
chat template (the adapter's own where training supplied one) with the generation prompt; an Alpaca-trained
adapter's single user message through the Alpaca template. POST /v1/completions continues the prompt text
as it is, after the tokenizer's special prefix (BOS), or the token ids given (lm-evaluation-harness sends
ids); as OpenAI's API does, and as training rendered plain text.

Extensions beyond OpenAI's fields: ``adamole_routing`` (true: each choice carries, per generated token, the
experts fired in each adapted layer) and ``ignore_eos`` (true: the stop tokens do not end the reply; for
fixed-length benchmarks, as vLLM offers it). Fields OpenAI defines that change what is generated and that
this server does not implement are refused when set (penalties, logit_bias, best_of > n, suffix, tools)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from adamole_dist.data.examples import DataError
from adamole_dist.generation.prompts import PromptRenderer, conversation_record
from adamole_dist.generation.sampling import Sampling
from adamole_dist.serving.errors import RequestError
from adamole_dist.serving.fields import Fields
from adamole_dist.serving.models import ServedModel

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "developer", "tool")
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}


@dataclass
class GenerationParams:
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False
    stream: bool = False
    routing: bool = False
    ignore_eos: bool = False


@dataclass
class Job:
    """One request: ``prompts`` (token ids), each answered ``params.n`` times; choice i*n + j is prompt i's
    j-th answer."""

    kind: str  # "completion" or "chat"
    model: ServedModel
    prompts: list[list[int]]
    params: GenerationParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def pick_model(fields: Fields, models: dict[str, ServedModel]) -> ServedModel:
    name = fields.string("model")
    if name is None:
        raise RequestError(f"model is required: one of {', '.join(models)}", "model", "missing_field")
    if name not in models:
        raise RequestError(f"model {name!r} is not served here; models: {', '.join(models)}", "model",
                           "model_not_found")
    return models[name]


def refuse_unsupported(fields: Fields) -> None:
    """400 naming a field OpenAI defines, set to something this server does not do."""
    for name, neutral in NEUTRAL.items():
        if fields.present(name) and fields.raw(name) != neutral:
            raise RequestError(f"{name} is not supported by this server (leave it unset or neutral)", name,
                               "unsupported")
    for name in ("logit_bias", "suffix", "tools", "functions"):
        if fields.raw(name):
            raise RequestError(f"{name} is not supported by this server", name, "unsupported")
    if fields.present("best_of") and fields.raw("best_of") != fields.raw("n", 1):
        raise RequestError("best_of is not supported by this server (leave it unset, or equal to n)", "best_of",
                           "unsupported")
    if fields.object("response_format").get("type", "text") != "text":
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", "response_format",
                           "unsupported")


def common_params(fields: Fields, model: ServedModel, max_tokens: int, logprobs: int | None) -> GenerationParams:
    """The generation fields both endpoints share, checked."""
    refuse_unsupported(fields)
    routing = fields.boolean("adamole_routing", False)
    if routing and not model.has_experts:
        raise RequestError(f"adamole_routing: model {model.name!r} has no experts to route "
                           f"({'a base model alone' if model.adapters is None else model.adapters.cfg.method})",
                           "adamole_routing")
    sampling = Sampling(fields.number("temperature", 0.0, 0.0, 2.0),
                        fields.number("top_p", 1.0, 0.0, 1.0, lo_open=True), fields.integer("seed", None))
    return GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=fields.strings("stop", MAX_STOPS),
                            n=fields.integer("n", 1, 1, MAX_N), logprobs=logprobs,
                            stream=fields.boolean("stream", False), routing=routing,
                            ignore_eos=fields.boolean("ignore_eos", False))


def completion_prompts(fields: Fields, model: ServedModel) -> list[list[int]]:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of such arrays."""
    value = fields.raw("prompt")
    if value is None:
        raise RequestError("prompt is required", "prompt", "missing_field")
    items = [value] if isinstance(value, str) or (isinstance(value, list) and value
                                                  and all(isinstance(t, int) for t in value)) else value
    if not isinstance(items, list) or not items:
        raise RequestError("prompt must be a string, an array of strings or of token ids (non-empty)", "prompt",
                           "invalid_type")
    vocab = len(model.tokenizer)
    renderer = PromptRenderer(model.tokenizer, "text")
    rows = []
    for item in items:
        if isinstance(item, str):
            rows.append(renderer.ids({"prompt": item}))
        elif isinstance(item, list) and item and all(type(t) is int and 0 <= t < vocab for t in item):
            rows.append(list(item))
        else:
            raise RequestError(f"prompt: each prompt must be a string or a non-empty array of token ids in "
                               f"[0, {vocab})", "prompt", "invalid_value")
    return rows


def chat_messages(fields: Fields) -> list[dict]:
    """``messages``: a non-empty array of {"role", "content"}; content a string or an array of text parts."""
    value = fields.raw("messages")
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty array of {\"role\", \"content\"} objects", "messages",
                           "missing_field" if value is None else "invalid_type")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where} must be an object with a role ({', '.join(ROLES)})", where)
        content = m.get("content")
        if isinstance(content, list):  # parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\"}}) are "
                                   "supported", where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or an array of text parts", where, "invalid_type")
        messages.append({"role": m["role"], "content": content})
    return messages


def fit_length(job: Job, fields: Fields, max_model_len: int, where: str) -> Job:
    """Every prompt plus max_tokens within --max_model_len (an explicit max_tokens that does not fit is a 400;
    the default shrinks to what fits)."""
    longest = max(map(len, job.prompts))
    if longest >= max_model_len:
        raise RequestError(f"{where}: {longest} tokens; this server's limit (--max_model_len) is {max_model_len} "
                           "tokens, prompt and reply together", where, "context_length_exceeded")
    room = max_model_len - longest
    if job.params.max_tokens > room:
        if fields.present("max_tokens") or fields.present("max_completion_tokens"):
            raise RequestError(f"max_tokens ({job.params.max_tokens}) + the prompt ({longest} tokens) exceed this "
                               f"server's limit (--max_model_len) of {max_model_len} tokens", "max_tokens",
                               "context_length_exceeded")
        job.params.max_tokens = room
    return job


def parse_completion(body, models: dict[str, ServedModel], max_model_len: int) -> Job:
    """POST /v1/completions."""
    fields = Fields(body)
    model = pick_model(fields, models)
    prompts = completion_prompts(fields, model)
    logprobs = fields.integer("logprobs", None, 0, MAX_LOGPROBS)
    params = common_params(fields, model, fields.integer("max_tokens", 16, 0), logprobs)
    params.echo = fields.boolean("echo", False)
    if params.max_tokens == 0 and not params.echo:
        raise RequestError("max_tokens must be >= 1 (0 only with echo: the prompt's log-probabilities)",
                           "max_tokens")
    return fit_length(Job("completion", model, prompts, params), fields, max_model_len, "prompt")


def parse_chat(body, models: dict[str, ServedModel], max_model_len: int) -> Job:
    """POST /v1/chat/completions."""
    fields = Fields(body)
    model = pick_model(fields, models)
    messages = chat_messages(fields)
    try:
        record = conversation_record(messages, model.prompt_format)
        prompt = PromptRenderer(model.tokenizer, model.prompt_format).ids(record, "messages")
    except DataError as e:
        raise RequestError(str(e), "messages") from None
    logprobs = fields.integer("top_logprobs", 0, 0, MAX_LOGPROBS) if fields.boolean("logprobs", False) else None
    tokens = fields.integer("max_completion_tokens", None, 1)
    tokens = fields.integer("max_tokens", tokens if tokens is not None else max_model_len, 1)
    params = common_params(fields, model, tokens, logprobs)
    return fit_length(Job("chat", model, [prompt], params), fields, max_model_len, "messages")
