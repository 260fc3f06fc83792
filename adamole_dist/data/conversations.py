"""Free-form (SFT) records -> normalised records, every record validated before any tokenisation.

The formats (detected in formats.py from the first record, or forced with --data_format):

* ``messages`` (OpenAI / Hugging Face chat): ``{messages: [{role: system|user|assistant, content}]}``
* ``sharegpt``: ``{conversations: [{from: system|human|gpt, value}]}`` (``user``/``assistant`` are
  accepted as ``from`` too: files converted by other tools use them)
* ``prompt_completion`` (TRL's convention): ``{prompt, completion}``
* ``alpaca``: ``{instruction, input?, output}`` with a free-form output
* ``text``: ``{text}`` (continued pre-training)

Normalised records are plain dicts (picklable: sft_render.tokenize_record takes them, possibly
in ``datasets.map`` workers): chat formats become ``{"messages": [{"role", "content"}, ...]}``
(so does alpaca under ``--alpaca_as_chat``), the others keep their fields as strings
(``{"instruction", "input", "output"}``, ``{"prompt", "completion"}``, ``{"text"}``).

Every error names the origin (file), the record index and the field, e.g.
``data/train.json record 3: field 'messages[1].role' ('bot') is not a known role``.
"""

from __future__ import annotations

from adamole_dist.data.formats import SFT_FORMATS, DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
CHAT_FORMATS = ("messages", "sharegpt")
# What generation must render a prompt as (adapter metadata "prompt_format", interfaces.md).
PROMPT_FORMATS = {"messages": "chat", "sharegpt": "chat", "alpaca": "alpaca", "prompt_completion": "prompt_completion",
                  "text": "text"}


def prompt_format(data_format: str, alpaca_as_chat: bool = False) -> str:
    """"chat" | "alpaca" | "text" | "prompt_completion" | "multiple_choice" for a record format."""
    if data_format not in SFT_FORMATS:
        return "multiple_choice"
    if data_format == "alpaca" and alpaca_as_chat:
        return "chat"
    return PROMPT_FORMATS[data_format]


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _string(rec: dict, field: str, where: str, *, optional: bool = False, allow_empty: bool = False) -> str:
    value = rec.get(field)
    if value is None and optional:
        return ""
    if value is None:
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, not {_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _content(turn: dict, where: str, at: str, content_key: str) -> str:
    content = turn.get(content_key)
    if content is None:
        raise DataError(f"{where}: field '{at}.{content_key}' is missing")
    if isinstance(content, list):
        # Refused, not reduced to its text parts: a reply about an image, trained without the image,
        # would teach the model to answer what it was never shown.
        raise DataError(f"{where}: field '{at}.{content_key}' is a list of content parts (OpenAI style: text, "
                        "images); list content is not supported: give the turn's text as a string")
    if not isinstance(content, str):
        raise DataError(f"{where}: field '{at}.{content_key}' must be a string, not {_type(content)}")
    return content


def check_turns(turns, where: str, field: str, role_key: str = "role", content_key: str = "content",
                roles: dict | None = None) -> list[dict]:
    """A conversation's turns validated -- a non-empty list of objects with a known role and string
    content -- as [{"role", "content"}] with the roles mapped by ``roles`` (default: system, user,
    assistant). Training's records and generation's prompts both go through it."""
    roles = roles if roles is not None else {r: r for r in ROLES}
    if turns is None:
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {field!r} must be a list of turns, not {_type(turns)}")
    if not turns:
        raise DataError(f"{where}: field {field!r} is an empty conversation")
    known = ", ".join(dict.fromkeys(roles))
    out = []
    for j, turn in enumerate(turns):
        at = f"{field}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {at!r} must be an object with {role_key!r} and {content_key!r}, "
                            f"not {_type(turn)}")
        role = turn.get(role_key)
        if role is None:
            raise DataError(f"{where}: field '{at}.{role_key}' is missing")
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: field '{at}.{role_key}' ({role!r}) is not a known role ({known})")
        out.append({"role": roles[role], "content": _content(turn, where, at, content_key)})
    return out


def _turns(rec: dict, where: str, field: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    out = check_turns(rec.get(field), where, field, role_key, content_key, roles)
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: field {field!r} has no assistant turn (nothing to train on)")
    return out


def alpaca_user_content(instruction: str, inp: str) -> str:
    """The user turn of an Alpaca record rendered as chat (--alpaca_as_chat): the instruction, then the
    input after a blank line. Generation renders a chat prompt with an "input" the same way."""
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def alpaca_messages(instruction: str, inp: str, output: str) -> list[dict]:
    """An Alpaca record as one user turn (alpaca_user_content) and the answer."""
    return [{"role": "user", "content": alpaca_user_content(instruction, inp)},
            {"role": "assistant", "content": output}]


def normalise_record(rec, fmt: str, where: str, *, alpaca_as_chat: bool = False) -> dict:
    """One record of format ``fmt`` as a normalised record (module docstring); DataError names ``where``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields, got {_type(rec)}")
    if fmt == "messages":
        return {"messages": _turns(rec, where, "messages", "role", "content", {r: r for r in ROLES})}
    if fmt == "sharegpt":
        return {"messages": _turns(rec, where, "conversations", "from", "value", SHAREGPT_ROLES)}
    if fmt == "prompt_completion":
        return {"prompt": _string(rec, "prompt", where), "completion": _string(rec, "completion", where)}
    if fmt == "alpaca":
        instruction, output = _string(rec, "instruction", where), _string(rec, "output", where)
        inp = _string(rec, "input", where, optional=True, allow_empty=True)
        if alpaca_as_chat:
            return {"messages": alpaca_messages(instruction, inp, output)}
        return {"instruction": instruction, "input": inp, "output": output}
    if fmt == "text":
        return {"text": _string(rec, "text", where)}
    raise DataError(f"data_format ({fmt!r}) is not a free-form format ({', '.join(SFT_FORMATS)})")


def normalise_records(records: list, fmt: str, origin: str, *, alpaca_as_chat: bool = False) -> list[dict]:
    """Every record validated (the first bad one raises, naming origin, record index and field)."""
    if not records:
        raise DataError(f"{origin}: the dataset is empty")
    return [normalise_record(rec, fmt, f"{origin} record {i}", alpaca_as_chat=alpaca_as_chat)
            for i, rec in enumerate(records)]
