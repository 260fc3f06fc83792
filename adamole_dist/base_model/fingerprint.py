"""A cheap content hash of a base model folder: does the base found here hold the weights an adapter was
trained on?

A full sha256 of a multi-GB checkpoint takes minutes; this reads at most 2 MiB per weight file. It hashes
config.json whole, then for every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``, sorted by
name) its name, its size, its first MiB and its last MiB. A safetensors file opens with its header (every
tensor's name, dtype, shape and byte range), so the first MiB covers the layout; the first and last MiB also
cover the first and last tensors' bytes. A retrained or re-quantised checkpoint changes sizes or those bytes; a
change confined to the middle of a file is missed -- the price of reading megabytes, not gigabytes. Tokenizer
files are left out: they do not change what the adapter's weights mean.

The value is ``"v1:<hex>"``; a value of another version is not compared. A mismatch is a warning, not a
refusal: a GGUF model's dequantised cache (gguf_cache.py) is rebuilt byte-for-byte only with the same
transformers, and a user may knowingly load an adapter on a close relative of its base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

VERSION = "v1"
EDGE = 1 << 20  # bytes read from each end of a weight file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def fingerprint_folder(folder: str | Path) -> str | None:
    """``"v1:<hex>"`` for a model folder holding config.json, else None (nothing here to hash)."""
    root = Path(folder)
    config = root / "config.json"
    if not config.is_file():
        return None
    digest = hashlib.sha256(config.read_bytes())
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest.update(json.dumps([path.name, size]).encode())
        with path.open("rb") as f:
            digest.update(f.read(EDGE))
            if size > 2 * EDGE:
                f.seek(size - EDGE)
                digest.update(f.read(EDGE))
            elif size > EDGE:
                digest.update(f.read())
    return f"{VERSION}:{digest.hexdigest()}"


def local_folder(source: str | Path) -> Path | None:
    """The folder ``source`` loads from on this machine: itself when it is a folder, a hub id's snapshot in the
    local Hugging Face cache, else None (nothing local to hash; never a download)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).count("/") != 1:
        return None  # a file (a .gguf resolves to its converted folder first) or no hub id ("org/name")
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(source), "config.json")
    except Exception:  # a malformed id: nothing cached under it
        return None
    return Path(found).parent if isinstance(found, str) else None


def fingerprint_of(source: str | Path) -> str | None:
    """The fingerprint of what ``source`` (a folder, or a hub id already in the local cache) holds, else None."""
    folder = local_folder(source)
    return fingerprint_folder(folder) if folder is not None else None
