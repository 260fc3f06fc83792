"""Output paths checked before any work: a command that would fail to write its result, or would
overwrite what it must not, finds out first, not after the model loaded and the work ran.

One check for each kind of output, shared by the commands (train's output_dir in output_dir.py,
generate's --out, eval's --json and its harness files, export's --out):

* a file (``check_output_file``): not a directory, writable, not one of the command's inputs (its
  prompt file, dataset, adapter files: writing would empty the input before it is read again, or for
  good), not inside a training run (a run's folder holds that run's files only);
* a folder written whole (``check_output_folder``): not a file, not a training run nor inside one, not
  an input nor holding one, and when it is not empty, ``--overwrite`` replaces it only when an earlier
  run of the same writer made it (atomic_files.WRITTEN_FILES lists its files) and it holds nothing else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from adamole_dist.atomic_files import WRITTEN_FILES, foreign_entries
from adamole_dist.config.fields import ConfigError

RUN_CONFIG = "run_config.json"  # the run record: a folder holding it is a training run (output_dir.py)
Inputs = Iterable[tuple[str, Path]]  # what a command reads: (the option naming it, its path)


def enclosing_run(path: Path) -> Path | None:
    """The training run folder ``path`` is, or lies inside: the nearest of it and its parents that holds
    a run record. None outside every run."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def _within(path: Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_writable_file(path: Path, option: str) -> None:
    """``path`` can be created or replaced: probed by opening it for appending, which changes nothing
    in an existing file; a file the probe created is removed again. ConfigError naming ``option``."""
    if path.is_dir():
        raise ConfigError(f"{option} ({path}) is a directory; it names the file to write")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{option} ({path}) cannot be written: {e.strerror}") from None
    if not existed:
        path.unlink()


def check_creatable_folder(path: Path, option: str) -> None:
    """The folder, or the nearest existing folder above it, must be a directory we can write."""
    target = Path(path)
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        raise ConfigError(f"{option} ({path}): {target} exists and is not a directory")
    try:  # a real probe: permission bits say nothing for root or on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".adamole-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = "is not writable" if target == Path(path) else f"cannot be created: {target} is not writable"
        raise ConfigError(f"{option} ({path}) {what} ({e.strerror or e})") from None


def check_output_file(path: Path, option: str, inputs: Inputs = ()) -> None:
    """A file the command will write (see the module docstring); ConfigError naming ``option``. ``inputs``:
    (the option that names it, path) of the files the command reads, and of folders whose existing files
    it reads (an adapter directory)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} ({path}) is a directory; it names the file to write")
    for name, source in inputs:
        source = Path(source)
        if path.exists() and source.exists() and (os.path.samefile(path, source) or (
                source.is_dir() and _within(path, source))):
            what = f"the {name} file {source}" if source.is_file() else f"a file of the {name} folder {source}"
            raise ConfigError(f"{option} ({path}) is {what}: writing it would destroy what the command reads; "
                              "write elsewhere")
    run = enclosing_run(path.parent)
    if run is not None:
        raise ConfigError(f"{option} ({path}) is inside the training run {run}, whose folder holds only that run's "
                          "files; write it elsewhere")
    check_writable_file(path, option)


def check_output_folder(path: Path, option: str, *, overwrite: bool, inputs: Inputs = (),
                        writer: str = "export") -> None:
    """A folder the command writes whole (see the module docstring); ConfigError naming ``option``.
    ``writer``: what writes it, as the messages name it ("export")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} ({path}) exists and is not a directory")
    run = enclosing_run(path)
    if run is not None:
        where = "is the training run" if run == path.absolute() else "is inside the training run"
        raise ConfigError(f"{option} ({path}) {where} {run}; its folder holds only that run's files: write elsewhere")
    for name, source in inputs:
        if _within(source, path):
            raise ConfigError(f"{option} ({path}) {'is' if _within(path, source) else 'holds'} the {name} folder "
                              f"{source}, which the command reads; write elsewhere")
        if _within(path, source):
            raise ConfigError(f"{option} ({path}) is inside the {name} folder {source}, which the command reads; "
                              "write elsewhere")
    if path.is_dir() and any(path.iterdir()):
        check_replaceable(path, option, overwrite, writer)
    check_creatable_folder(path, option)


def check_replaceable(path: Path, option: str, overwrite: bool, writer: str) -> None:
    """A non-empty folder may be replaced only on ``overwrite``, and only when an earlier run of the same
    writer made it and it holds nothing else (as train's --overwrite refuses a run beside foreign files)."""
    if not overwrite:
        raise ConfigError(f"{option} ({path}) exists and is not empty (pass --overwrite to replace it)")
    foreign = foreign_entries(path)
    if foreign is None:
        shown = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        raise ConfigError(f"--overwrite: {option} ({path}) holds {', '.join(shown[:5])}"
                          f"{', ...' if len(shown) > 5 else ''}, which no earlier {writer} wrote (it lists its files "
                          f"in {WRITTEN_FILES}); --overwrite replaces only such a folder: choose another")
    if foreign:
        raise ConfigError(f"--overwrite: {option} ({path}) also holds {', '.join(foreign)}, which the earlier {writer} "
                          f"did not write; move {'it' if len(foreign) == 1 else 'them'} out or choose another folder")
