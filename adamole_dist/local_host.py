"""What a process learns of the machine it runs on: the project's cache folder (and how a finished cache
build is made readable to every job sharing it), and whether a process id of this host still runs.
Ground floor: the model cache (base_model/), the token cache (data/) and the output-dir lock
(run_files/) all ask these questions."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """The project's cache folder: ``$ADAMOLE_DIST_CACHE``, by default ``~/.cache/adamole_dist``
    (converted models in ``models/``, tokenized datasets in ``tokenized/``)."""
    return Path(os.environ.get("ADAMOLE_DIST_CACHE", Path.home() / ".cache" / "adamole_dist"))


def readable_by_all(folder: Path) -> None:
    """Give a finished cache build (a model conversion, a tokenized split) the permissions of an ordinary
    folder under the umask: tempfile.mkdtemp makes it 0700, so a cache another user built, or one
    mounted read-only for a job, could not be read by anyone but its builder."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def process_alive(pid: int) -> bool:
    """Whether a process of this host has the pid (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
