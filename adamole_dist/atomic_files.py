"""Atomic writes: a reader (or a crash) never sees half a file or half a directory.

A folder written whole may also record what it holds (``record=``: WRITTEN_FILES lists its files), so
that a later ``--overwrite`` can tell a folder this writer made, which it may replace, from one that
holds anything else (a training run, someone's notes), which it must not: ``foreign_entries``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable


def write_text_atomically(target: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary beside ``target``, then rename it into place."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


WRITTEN_FILES = ".written_files.json"  # in a folder written with record=: {..., "files": [what it wrote]}


@contextmanager
def open_atomically(target: Path) -> Iterator[IO[str]]:
    """A text file to write ``target`` through: a hidden temporary beside it, renamed into place when the
    block ends, removed if it raises (Ctrl-C included), so ``target`` is either complete or as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dir_atomically(target: Path, write: Callable[[Path], None], record: dict | None = None) -> None:
    """Call ``write(tmp_dir)``, then swap the directory into place: readers never see half a save. A
    failure (or Ctrl-C) while writing removes the temporary folder and leaves ``target`` as it was.
    ``record``: also write WRITTEN_FILES, the record with the list of files written."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if record is not None:
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            (tmp / WRITTEN_FILES).write_text(json.dumps({**record, "files": files}, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def foreign_entries(folder: Path) -> list[str] | None:
    """The entries of ``folder`` that its writer did not write ("name" or "name/" for a folder), [] when
    it holds only those; None when it holds no WRITTEN_FILES record (no writer of this package made it)."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / WRITTEN_FILES).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    written = {WRITTEN_FILES} | {name.split("/")[0] for name in listed}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in written)
