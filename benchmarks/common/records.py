"""Writing benchmark records: JSON replaced atomically, so an interrupted run never leaves a
half-written results file (a grid that resumes from its JSON must be able to read it back)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_records(path: Path, records: list[dict], announce: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")


def read_records(path: Path) -> list[dict]:
    """The records in ``path``, or none when it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else []
