"""One run at a time in an output directory: an exclusive lock held for the run's life.

The lock is the file ``<output_dir>/.run.lock``, holding its owner's host and pid (for messages),
and an ``fcntl.flock`` on it: the kernel (or the NFS lock manager) drops the flock when its process
dies however it dies, so a lock file whose flock can be taken belongs to a run that is gone, and is
taken over (said so). Where a filesystem has no flock, the owner's pid decides on its host; an owner
on another host cannot be checked there and is refused. Rank 0 alone takes it (assembly.build_run);
its answer reaches every rank with the rest of the output-dir checks.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from adamole_dist.config.fields import ConfigError
from adamole_dist.local_host import process_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a filesystem without flock


def _owner(fd: int) -> dict:
    """The recorded owner ({host, pid}), or {} for an empty or unreadable record."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}" if owner else "another process"


def _flock(fd: int) -> bool | None:
    """True: we hold the flock; False: a live process holds it; None: the filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_FLOCK:
            return None
        raise


def _held_by_someone_else(locked: bool | None, owner: dict) -> bool:
    if owner == this_process():  # this process's own lock (checked again under it)
        return False
    if locked is not None:
        return not locked
    if not owner:
        return False
    return (owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int)
            or process_alive(owner["pid"]))


def in_use_error(output_dir: Path, owner: dict) -> ConfigError:
    return ConfigError(f"output_dir ({output_dir}) is in use by the run of {describe(owner)} (lock file "
                       f"{Path(output_dir) / LOCK_FILE}); wait for that run to end or choose another directory "
                       "(delete the lock file only if that process is gone)")


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def check_lock_file(output_dir: Path) -> Path:
    """The lock file's path; ConfigError when something other than a file has its name (a directory, a
    socket): no run of this trainer made it, and opening it would fail deep inside the lock."""
    path = Path(output_dir) / LOCK_FILE
    if (path.exists() or path.is_symlink()) and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise ConfigError(f"output_dir ({output_dir}): {path} is {what}, not the lock file this trainer writes; "
                          "remove it (no run of this trainer made it) or choose another directory")
    return path


def check_unlocked(output_dir: Path) -> None:
    """Read-only (before anything is written): refuse an output dir that a live run holds."""
    path = check_lock_file(output_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        locked = _flock(fd)
        if _held_by_someone_else(locked, _owner(fd)):
            raise in_use_error(output_dir, _owner(fd))
    finally:
        os.close(fd)  # drops our probe's flock too


class RunLock:
    """Held from ``take`` until ``release`` (Run.close; at exit at the latest, should set-up fail)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def take(cls, output_dir: Path) -> "RunLock":
        """Create the output dir if needed and lock it; ConfigError naming the owner when a live run holds it."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = check_lock_file(output_dir)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            locked, owner = _flock(fd), _owner(fd)
            if _held_by_someone_else(locked, owner):
                os.close(fd)
                raise in_use_error(output_dir, owner)
            try:  # the previous owner may have removed the file between our open and our flock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        if owner and owner != this_process():
            log.info(f"output_dir ({output_dir}): took over the lock of {describe(owner)}, which is no longer "
                     "running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(this_process()).encode(), 0)
        os.fsync(fd)
        lock = cls(path, fd)
        atexit.register(lock.release)
        return lock

    def release(self) -> None:
        """Remove the lock file, then drop the flock (in that order, so nobody locks a removed file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
            atexit.unregister(self.release)
