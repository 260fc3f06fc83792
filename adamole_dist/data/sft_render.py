"""Normalised free-form records (conversations.py) -> tokenized examples {"input_ids", "labels"}.

Labels are aligned with the ids, ``IGNORE`` where a token is not a target; the first token is
never a target (nothing inside the example predicts it). What each format trains on:

* chat (``messages``, ``sharegpt``, ``alpaca`` with ``alpaca_as_chat``): the conversation rendered
  by the tokenizer's chat template (or ``spec.chat_template``). ``loss_on="assistant"``: every
  assistant turn is a target, from right after its generation prompt through the template's
  end-of-turn tokens. The turn's span is found by rendering prefixes: the prompt of assistant
  turn k is ``apply_chat_template(messages[:k], add_generation_prompt=True)`` -- exactly what
  generation is fed later -- and the text through it is ``apply_chat_template(messages[:k+1])``;
  both must be token prefixes of the whole conversation, else the template is refused (it
  renders earlier turns differently once later ones exist, so no prompt matches training).
  ``loss_on="all"``: every token.
* ``alpaca``: the Alpaca prompt (formats.ALPACA / ALPACA_WITH_INPUT), target the output + eos.
* ``prompt_completion``: target the completion + eos; ``text``: every token + eos.
  ``loss_on="all"`` makes the prompt a target too. These formats start with the tokenizer's
  special prefix (BOS) as the multiple-choice path does; chat templates write their own.

Nothing is cut here: an example longer than ``max_length`` is for the caller's policy
(``tokenize_split``: drop it and count it, or fail naming the record), never silently truncated.

Tokenizers are loaded by path once per process (``spec`` is small and picklable, so
``datasets.map`` workers can rebuild everything from it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from adamole_dist.config.chat_templates import BUILTIN_TEMPLATES, FAMILY_TEMPLATES
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TRUNCATIONS
from adamole_dist.data.conversations import CHAT_FORMATS, normalise_records, prompt_format
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.formats import ALPACA, ALPACA_WITH_INPUT, DataError, subsample

LOSS_ON = ("assistant", "all")  # config.training.LOSS_ON's free-form values
SAMPLE_TEXT_PROMPT_TOKENS = 32  # a text example's sample prompt: at most this many of its first tokens


@dataclass(frozen=True)
class RenderSpec:
    """How records become tokens: everything a tokenized example depends on (a cache key)."""

    tokenizer: str  # a path (or hub id) AutoTokenizer loads
    data_format: str  # one of formats.SFT_FORMATS
    max_length: int
    loss_on: str = "assistant"  # LOSS_ON: the responses only, or every token
    chat_template: str | None = None  # Jinja text; None = the tokenizer's own template
    alpaca_as_chat: bool = False
    # the model as the user named it (a .gguf, a package name), for messages: ``tokenizer`` may be a cache folder
    model_name: str = field(default="", compare=False)

    @property
    def model_named(self) -> str:
        return self.model_name or self.tokenizer

    @property
    def prompt_format(self) -> str:
        return prompt_format(self.data_format, self.alpaca_as_chat)

    @property
    def is_chat(self) -> bool:
        return self.prompt_format == "chat"


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_for(spec: RenderSpec):
    return load_tokenizer(spec.tokenizer)


def chat_template_of(spec: RenderSpec, tokenizer=None) -> str:
    """The template chat formats render with; ConfigError naming the tokenizer when there is none."""
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(spec)
    template = spec.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"data_format {spec.data_format!r}{' with alpaca_as_chat' if spec.alpaca_as_chat else ''} "
                          f"renders conversations with a chat template, and the tokenizer of {spec.model_named} has "
                          f"none: pass --chat_template FILE (a Jinja template) or a built-in "
                          f"({', '.join(BUILTIN_TEMPLATES)}){family_hint(spec.tokenizer)}")
    if not isinstance(template, str):  # a tokenizer with several named templates
        raise ConfigError(f"the tokenizer of {spec.model_named} has several named chat templates "
                          f"({', '.join(template)}): pass the one to use with --chat_template FILE")
    return template


def family_hint(model_path: str) -> str:
    """"; its family's is gemma" where the model folder's model_type has a built-in, else ""."""
    try:
        model_type = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):  # a hub id, an unreadable or foreign config: no hint
        return ""
    name = FAMILY_TEMPLATES.get(model_type)
    return f"; its family ({model_type}) uses --chat_template {name}" if name else ""


def check_template_syntax(template: str, origin: str) -> None:
    """Parse ``template`` as transformers will (its sandboxed Jinja environment, with the loop controls and
    generation tags it allows) before any record renders: a syntax error is named with ``origin`` and its
    line, not as every record's rendering failure once tokenisation has started."""
    import jinja2
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    try:
        if compile_template is not None:
            compile_template(template)
        else:  # a transformers without the helper: the same parse, minus its generation tags
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{origin} line {e.lineno}: not a valid Jinja template: {e.message}") from None


def check_spec(spec: RenderSpec) -> None:
    """ConfigError for a spec that cannot render (before any record is tokenized)."""
    if spec.loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on ({spec.loss_on!r}) must be one of {', '.join(LOSS_ON)} for {spec.data_format} data")
    if spec.is_chat:
        origin = "chat_template" if spec.chat_template else f"the chat template of the tokenizer of {spec.model_named}"
        check_template_syntax(chat_template_of(spec), origin)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_prefix(tokenizer) -> list[int]:
    """The special ids the tokenizer puts before a text (BOS; BERT's [CLS]), none of those after it."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = encode(tokenizer, "a")
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k: k + len(plain)] == plain:
            return with_special[:k]
    return []


def eos_of(tokenizer) -> list[int]:
    """The tokenizer's eos as a list (empty without one): what a target ends with. Generation's stop
    tokens (generation/stops.py) start from it."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


# -- chat ------------------------------------------------------------------------------------------
def render_chat(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text of ``messages``; DataError (with the template's message) when it refuses them."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError from raise_exception(), or any error inside the template
        roles = "/".join(t["role"] for t in messages)
        raise DataError(f"the chat template cannot render this conversation (roles {roles or 'none'}): "
                        f"{type(e).__name__}: {e}") from None


def chat_prompt_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """What generation is fed for the reply after ``messages``."""
    return encode(tokenizer, render_chat(tokenizer, template, messages, add_generation_prompt=True))


def tokenize_chat(messages: list[dict], tokenizer, template: str, loss_on: str) -> dict:
    ids = encode(tokenizer, render_chat(tokenizer, template, messages))
    labels = list(ids) if loss_on == "all" else [IGNORE] * len(ids)
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = chat_prompt_ids(tokenizer, template, messages[:k])
        through = encode(tokenizer, render_chat(tokenizer, template, messages[: k + 1]))
        if through[: len(prompt)] != prompt or ids[: len(through)] != through:
            raise DataError(f"the chat template breaks the prefix property at turn {k} (field 'messages[{k}]'): "
                            "rendering the conversation up to this assistant turn with add_generation_prompt "
                            "does not give the start of the whole conversation's tokens, so what training sees "
                            "is not what generation would be fed; use a template that renders earlier turns "
                            "the same whatever follows (--chat_template FILE)")
        if loss_on == "assistant":
            labels[len(prompt): len(through)] = through[len(prompt):]
    return {"input_ids": ids, "labels": labels}


# -- prompt + response formats ---------------------------------------------------------------------------
def prompt_and_response(record: dict, data_format: str) -> tuple[str, str]:
    """(prompt text, response text) of an alpaca or prompt_completion record; text: ("", text)."""
    if data_format == "alpaca":
        inp = record.get("input") or ""
        prompt = (ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=inp) if inp.strip()
                  else ALPACA.format(instruction=record["instruction"]))
        return prompt, record["output"]
    if data_format == "prompt_completion":
        return record["prompt"], record["completion"]
    if data_format == "text":
        return "", record["text"]
    raise ValueError(f"{data_format!r} is not a prompt + response format")


def tokenize_plain(record: dict, data_format: str, tokenizer, loss_on: str) -> dict:
    prompt_text, response_text = prompt_and_response(record, data_format)
    prompt = special_prefix(tokenizer) + (encode(tokenizer, prompt_text) if prompt_text else [])
    response = encode(tokenizer, response_text) + eos_of(tokenizer)
    everything = loss_on == "all" or data_format == "text"
    return {"input_ids": prompt + response,
            "labels": (list(prompt) if everything else [IGNORE] * len(prompt)) + response}


# -- the interface ------------------------------------------------------------------------------------------
def tokenize_record(record: dict, spec: RenderSpec) -> dict:
    """A normalised record (conversations.py) -> {"input_ids", "labels"}; the whole example, not cut
    to max_length. DataError (without the record's index: the caller adds it) when it cannot be rendered."""
    tokenizer = tokenizer_for(spec)
    if "messages" in record:
        example = tokenize_chat(record["messages"], tokenizer, chat_template_of(spec, tokenizer), spec.loss_on)
    else:
        example = tokenize_plain(record, spec.data_format, tokenizer, spec.loss_on)
    if example["labels"]:
        example["labels"][0] = IGNORE  # never predicted from inside the example
    if not any(lb != IGNORE for lb in example["labels"]):
        raise DataError("the example has no target tokens (nothing to train on)")
    return example


def sample_prompt(record: dict, spec: RenderSpec) -> tuple[list[int], str]:
    """(prompt ids generation is fed, the reference reply) of an example, for logged greedy samples:
    chat up to its first assistant turn, alpaca / prompt_completion their prompt, text its first tokens."""
    tokenizer = tokenizer_for(spec)
    if "messages" in record:
        messages = record["messages"]
        k = next(i for i, t in enumerate(messages) if t["role"] == "assistant")
        return chat_prompt_ids(tokenizer, chat_template_of(spec, tokenizer), messages[:k]), messages[k]["content"]
    prompt_text, response_text = prompt_and_response(record, spec.data_format)
    prefix = special_prefix(tokenizer)
    if spec.data_format == "text":
        ids = encode(tokenizer, response_text)
        cut = min(SAMPLE_TEXT_PROMPT_TOKENS, max(1, len(ids) // 2))
        return prefix + ids[:cut], tokenizer.decode(ids[cut:])
    return prefix + encode(tokenizer, prompt_text), response_text


def question_text(record: dict, data_format: str) -> str:
    """What a person asked in an example, for showing its answers: the user turn before the first assistant
    turn, alpaca's instruction (and input), the prompt; text data asks nothing."""
    if "messages" in record:
        messages = record["messages"]
        k = next(i for i, t in enumerate(messages) if t["role"] == "assistant")
        return next((t["content"] for t in reversed(messages[:k]) if t["role"] == "user"), "")
    if data_format == "alpaca":
        return "\n".join(x for x in (record["instruction"], record.get("input") or "") if x.strip())
    return record.get("prompt", "")


@dataclass
class TokenizedSplit:
    """One split's tokenized examples (an indexable sequence) and what the length policy dropped."""

    examples: list[dict]
    records: list[dict]  # with keep_records: the normalised records kept, aligned with examples (sample prompts)
    dropped: int
    origin: str

    @property
    def lengths(self) -> list[int]:
        if hasattr(self.examples, "column_names"):  # a token-cache Dataset: its length column, not a decode per row
            return list(self.examples["length"])
        return [len(ex["input_ids"]) for ex in self.examples]


def tokenize_within_length(record: dict, spec: RenderSpec, truncation: str = "drop") -> dict | None:
    """``tokenize_record`` under the length policy: None (dropped, counted by the caller) for an example
    longer than ``spec.max_length`` under ``drop``, a DataError under ``error``. Module level, so a
    ``functools.partial`` of it pickles into the token cache's worker processes."""
    ex = tokenize_record(record, spec)
    n = len(ex["input_ids"])
    if n <= spec.max_length:
        return ex
    if truncation == "error":
        raise DataError(f"{n} tokens exceed max_length ({spec.max_length}); raise --max_length, or "
                        "--truncation drop leaves such examples out (counted in the log)")
    return None


def tokenize_split(raw_records: list, spec: RenderSpec, origin: str, *, truncation: str = "drop",
                   limit: int | None = None, seed: int = 0, keep_records: bool = True) -> TokenizedSplit:
    """Validate every record (all of them, before any tokenisation), take the seeded subsample of
    ``limit``, tokenize it, and apply the length policy: ``drop`` leaves out (and counts) an example
    longer than ``spec.max_length``, ``error`` fails naming it. Errors name origin, record index, field."""
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation ({truncation!r}) must be one of {', '.join(TRUNCATIONS)}")
    check_spec(spec)
    records = normalise_records(raw_records, spec.data_format, origin, alpaca_as_chat=spec.alpaca_as_chat)
    indices = subsample(list(range(len(records))), limit, seed)
    examples, kept, dropped = [], [], 0
    for i in indices:
        try:
            ex = tokenize_within_length(records[i], spec, truncation)
        except DataError as e:
            raise DataError(f"{origin} record {i}: {e}") from None
        if ex is None:
            dropped += 1
            continue
        examples.append(ex)
        if keep_records:
            kept.append(records[i])
    if not examples:
        raise all_dropped(origin, len(indices), spec.max_length)
    return TokenizedSplit(examples, kept, dropped, origin)


def all_dropped(origin: str, count: int, max_length: int) -> DataError:
    return DataError(f"{origin}: all {count} examples are longer than max_length ({max_length}) and were dropped; "
                     "raise --max_length")


__all__ = [
    "CHAT_FORMATS",
    "IGNORE",
    "LOSS_ON",
    "TRUNCATIONS",
    "RenderSpec",
    "TokenizedSplit",
    "sample_prompt",
    "tokenize_record",
    "tokenize_split",
]
