"""Typed option fields: ``opt()`` (a dataclass field with help text, choices, word aliases),
the one coercion path from text/YAML/JSON values to declared types, and ConfigError."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def opt(default: Any, help: str, choices: tuple | None = None, aliases: dict | None = None, **kw) -> Any:
    """A dataclass field carrying its help text (and choices, and word aliases of values) for the CLI."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if aliases is not None:
        meta["aliases"] = aliases
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def check_choice(prefix: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{prefix}{name} ({value!r}) must be one of {', '.join(map(str, choices))}")


def check_choices(obj: Any, prefix: str) -> None:
    """Coerce and type-check every field, and validate those declared with ``choices``."""
    coerce_types(obj, prefix)
    for f in dataclasses.fields(obj):
        if "choices" in f.metadata:
            check_choice(prefix, f.name, getattr(obj, f.name), f.metadata["choices"])


def _coerce(value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)  # accepts ints and YAML's "1e-3" strings
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return list(value)
    return value


def type_name(hint: Any) -> str:
    """'a number', 'a list (a,b,c)' ... for error messages (not "<class 'float'>")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        return f"{type_name(args[0])} or null"
    if hint is list or typing.get_origin(hint) is list:
        return "a list (comma-separated on the command line)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce_types(obj: Any, prefix: str) -> None:
    """Convert values given as text or ints (recipes, CLI) to the declared field types."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, str) and value in f.metadata.get("aliases", {}):
            value = f.metadata["aliases"][value]
        try:
            setattr(obj, f.name, _coerce(value, hints[f.name]))
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}{f.name} ({value!r}) must be {type_name(hints[f.name])}") from None
