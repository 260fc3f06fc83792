"""Prompts rendered exactly as training rendered them, from the records a user gives.

A prompt record is ``{"prompt": "..."}`` (with ``"input"`` for Alpaca's second field) or
``{"messages": [{"role": ..., "content": ...}, ...]}``. How it becomes token ids follows the adapter's
"prompt_format" (``prompt_format_for``): chat models through the chat template (the adapter's own
template where training supplied one) with the generation prompt added, Alpaca-trained adapters
through the Alpaca template, anything else as plain text after the tokenizer's special prefix (BOS).
A ``{"prompt", "input"}`` record in chat mode becomes the user turn --alpaca_as_chat trained on (the
instruction, a blank line, the input: conversations.alpaca_user_content), so an adapter trained on
Alpaca data rendered as chat is prompted as it was trained. Records are checked as training checks
its own (conversations.check_turns: known roles, string content). The rendering functions are
training's own (data/sft_render.py).
"""

from __future__ import annotations

from pathlib import Path

from adamole_dist.data.conversations import alpaca_user_content, check_turns
from adamole_dist.data.examples import DataError
from adamole_dist.data.formats import ALPACA, ALPACA_WITH_INPUT
from adamole_dist.data.json_records import json_kind, json_lines
from adamole_dist.data.sft_render import chat_prompt_ids, special_prefix

FORMATS = ("auto", "chat", "alpaca", "text")


def check_record(rec, where: str) -> dict:
    """The prompt record (see the module docstring) with its messages validated as training validates
    them (roles system, user, assistant; string content); DataError naming ``where`` and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with \"prompt\" or \"messages\", got {json_kind(rec)}")
    if "messages" in rec:
        return {**rec, "messages": check_turns(rec["messages"], where, "messages")}
    if not isinstance(rec.get("prompt"), str):
        what = "missing" if rec.get("prompt") is None else f"a {type(rec['prompt']).__name__}"
        raise DataError(f"{where}: needs a \"prompt\" string or a \"messages\" list (\"prompt\" is {what})")
    if not rec["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' is empty (nothing to continue from)")
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        raise DataError(f"{where}: field 'input' must be a string, not {type(rec['input']).__name__}")
    return rec


def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """(records of a JSONL prompt file, where each one is: "FILE line N"); DataError naming the file
    and line otherwise. Read as JSON (data/json_records.py): values as written, bytes that are not
    UTF-8 named with their line and offset."""
    if not path.is_file():
        raise DataError(f"prompt file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    records, places = [], []
    for n, rec in json_lines(path):
        records.append(check_record(rec, f"{path} line {n}"))
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
    text); without an adapter (``meta`` None) or for one that records "auto", chat where the tokenizer has a
    template."""
    if requested != "auto":
        return requested
    if meta is not None and meta.get("prompt_format") != "auto":  # auto: a PEFT LoRA, which records none
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
            # A prompt with an "input" is the user turn --alpaca_as_chat trained on (instruction, input).
            messages = rec.get("messages") or [{"role": "user",
                                                "content": alpaca_user_content(rec["prompt"], rec.get("input") or "")}]
            try:
                return chat_prompt_ids(tok, tok.chat_template, messages)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        text = rec["prompt"]
        if self.fmt == "alpaca":
            inp = rec.get("input") or ""
            text = (ALPACA_WITH_INPUT.format(instruction=text, input=inp) if inp.strip()
                    else ALPACA.format(instruction=text))
        ids = self.prefix + tok(text, add_special_tokens=False)["input_ids"]
        if not ids:  # nothing to continue from (a tokenizer without BOS and an empty prompt)
            raise DataError(f"{where}: the prompt is empty (no tokens to continue from)")
        return ids
