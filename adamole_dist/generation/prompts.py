"""Prompts rendered exactly as training rendered them, from the records a user gives.

A prompt record is ``{"prompt": "..."}`` (with ``"input"`` for Alpaca's second field) or
``{"messages": [{"role": ..., "content": ...}, ...]}``. How it becomes token ids follows the adapter's
"prompt_format" (``prompt_format_for``): chat models through the chat template (the adapter's own
template where training supplied one) with the generation prompt added, Alpaca-trained adapters
through the Alpaca template, anything else as plain text after the tokenizer's special prefix (BOS).
The rendering functions are training's own (data/sft_render.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from adamole_dist.data.examples import DataError
from adamole_dist.data.formats import ALPACA, ALPACA_WITH_INPUT
from adamole_dist.data.sft_render import chat_prompt_ids, special_prefix

FORMATS = ("auto", "chat", "alpaca", "text")


def check_record(rec, where: str) -> None:
    """DataError naming ``where`` unless ``rec`` is a prompt record (see the module docstring)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with \"prompt\" or \"messages\", got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in msgs)):
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    elif not isinstance(rec.get("prompt"), str):
        raise DataError(f"{where}: needs a \"prompt\" string or a \"messages\" list")


def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """(records of a JSONL prompt file, where each one is: "FILE line N"); DataError naming the file
    and line otherwise."""
    if not path.is_file():
        raise DataError(f"prompt file {path} not found")
    records, places = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not JSON ({e.msg}); a prompt file holds one JSON object "
                            "per line") from None
        check_record(rec, f"{path} line {n}")
        records.append(rec)
        places.append(f"{path} line {n}")
    if not records:
        raise DataError(f"prompt file {path} holds no prompts")
    return records, places


def conversation_record(messages: list[dict], fmt: str, where: str = "messages") -> dict:
    """The prompt record of a chat conversation (a server's chat request) for a model whose prompts render as
    ``fmt``: the messages themselves (the chat template), except for an Alpaca-trained adapter, which knew
    one instruction per prompt: a single user message becomes that instruction. DataError naming ``where``
    for a longer conversation there."""
    if fmt != "alpaca":
        return {"messages": messages}
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise DataError(f"{where}: this adapter was trained on Alpaca prompts (one instruction, no chat template): "
                        "send one user message")
    return {"prompt": messages[0]["content"]}


def prompt_format_for(requested: str, meta: dict | None, tokenizer) -> str:
    """``requested`` unless "auto": then the adapter's prompt_format (chat, alpaca; anything else is plain
    text); without an adapter (``meta`` None), chat where the tokenizer has a template."""
    if requested != "auto":
        return requested
    if meta is not None:
        fmt = meta.get("prompt_format")
        return fmt if fmt in ("chat", "alpaca") else "text"
    return "chat" if tokenizer.chat_template else "text"


class PromptRenderer:
    """A prompt record -> the token ids generation starts from: chat through the template with the
    generation prompt, else the special prefix (BOS) + the text, Alpaca-templated for alpaca (an
    "input" field gives ALPACA_WITH_INPUT)."""

    def __init__(self, tokenizer, fmt: str) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.prefix = special_prefix(tokenizer)

    def ids(self, rec: dict, where: str = "prompt") -> list[int]:
        tok = self.tokenizer
        if "messages" in rec or self.fmt == "chat":
            if not tok.chat_template:
                raise DataError(f"{where}: chat messages need a chat template and this tokenizer has none")
            messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
            try:
                return chat_prompt_ids(tok, tok.chat_template, messages)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        text = rec["prompt"]
        if self.fmt == "alpaca":
            inp = rec.get("input") or ""
            text = (ALPACA_WITH_INPUT.format(instruction=text, input=inp) if inp.strip()
                    else ALPACA.format(instruction=text))
        return self.prefix + tok(text, add_special_tokens=False)["input_ids"]
