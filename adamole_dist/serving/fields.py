"""Reading the fields of a request's JSON body: each getter checks one field's type and range and raises a
RequestError naming the field (``param``) and what is wrong with it. A field that is absent or null takes
its default, as OpenAI's API treats null."""

from __future__ import annotations

import math

from adamole_dist.serving.errors import RequestError


def _kind(value) -> str:
    return "null" if value is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                         list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


class Fields:
    """The fields of one request body (a JSON object)."""

    def __init__(self, body) -> None:
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {_kind(body)}", code="invalid_json")
        self.body = body

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def raw(self, name: str, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer, got {_kind(value)}", name, "invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise RequestError(f"{name} ({value}) must be {_range(lo, hi)}", name)
        return value

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"{name} must be a number, got {_kind(value)}", name, "invalid_type")
        if value < lo or value > hi or (lo_open and value == lo):
            raise RequestError(f"{name} ({value}) must be in {'(' if lo_open else '['}{lo}, {hi}]", name)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {_kind(value)}", name, "invalid_type")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name, default)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"{name} must be a string, got {_kind(value)}", name, "invalid_type")
        return value

    def strings(self, name: str, most: int) -> list[str]:
        """A string or an array of at most ``most`` strings (OpenAI's ``stop``)."""
        value = self.raw(name, [])
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise RequestError(f"{name} must be a string or an array of strings, got {_kind(value)}", name,
                               "invalid_type")
        if len(items) > most:
            raise RequestError(f"{name} holds {len(items)} strings; at most {most}", name)
        return items

    def object(self, name: str) -> dict:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise RequestError(f"{name} must be an object, got {_kind(value)}", name, "invalid_type")
        return value


def _range(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in [{lo}, {hi}]"
