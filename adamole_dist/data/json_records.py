"""JSON and JSON Lines files read as JSON: every value exactly as the file wrote it.

A columnar reader (``datasets``' JSON builder) infers one type per field across all records and, where
the records disagree (a list ``content`` in one record, strings in the others), falls back to pandas,
which turns the string ``"0."`` into the float ``0.0`` and fills a field a record lacks with null; the
errors that follow then blame a valid record. So data files (.json, .jsonl) and prompt files are read
here with ``json`` alone, one record at a time, and each record reaches the format checks as written.

Layouts: a ``.json`` file holds one JSON array of records, one record, or JSON Lines; a ``.jsonl`` (or a
prompt file) holds JSON Lines: one record per line, blank lines skipped. A record is a JSON object.
Every problem is a DataError naming the file and the line (and the column, or the byte offset of a byte
that is not UTF-8).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from adamole_dist.data.examples import DataError


def json_kind(value) -> str:
    """What a decoded JSON value is, in JSON's words (object, array, string, number, boolean, null)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a leading byte-order mark dropped); DataError naming the line and byte
    offset of the first byte that is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror or e}") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise DataError(f"{path} line {line}, column {column}: byte 0x{data[offset]:02x} at byte offset {offset} "
                        "is not UTF-8; save the file as UTF-8") from None


def _first_line_is_json(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(first)
        return True
    except json.JSONDecodeError:
        return False


def json_lines(path: Path, text: str | None = None) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON Lines file; DataError naming the first
    line that is not JSON."""
    text = read_text(path) if text is None else text
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON (column {e.colno}: {e.msg}); a JSON Lines "
                            "file holds one JSON object per line") from None
    return values


def read_json_records(path: Path) -> list[dict]:
    """The records of a .json or .jsonl data file (see the module docstring for the layouts)."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if not _first_line_is_json(text):  # one array or object over many lines: its syntax error is the problem
                raise DataError(f"{path} line {e.lineno}: not valid JSON (column {e.colno}: {e.msg})") from None
        else:
            if isinstance(whole, dict):
                return [whole]
            if not isinstance(whole, list):
                raise DataError(f"{path}: holds a JSON {json_kind(whole)}, not records (an array of objects, "
                                "or one object per line)")
            for i, rec in enumerate(whole):
                if not isinstance(rec, dict):
                    raise DataError(f"{path} record {i}: expected a JSON object with named fields, got "
                                    f"{json_kind(rec)}")
            return whole
    records = []
    for number, rec in json_lines(path, text):
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {number}: expected a JSON object with named fields, got {json_kind(rec)}")
        records.append(rec)
    return records
