"""Atomic writes: a reader (or a crash) never sees half a file or half a directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_text_atomically(target: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary beside ``target``, then rename it into place."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)``, then swap the directory into place: readers never see half a save."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
