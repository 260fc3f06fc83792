"""Output paths checked before any work: a command that would fail to write its result finds out
first, not after the model loaded and the work ran."""

from __future__ import annotations

from pathlib import Path

from adamole_dist.config.fields import ConfigError


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
