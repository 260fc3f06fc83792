"""GGUF models as ordinary Hugging Face folders, converted once into a local cache.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``) by dequantising every
tensor, which takes seconds even for a small model (benchmarks/README.md), and the result cannot
be saved as it is ("quantized with gguf"). So the first load converts it: the model is rebuilt
from its config without the quantization entry, the dequantised state dict is loaded strictly,
and model and tokenizer are saved as safetensors. Later runs, every rank, and ZeRO-3 see an
ordinary fp32 folder that loads quickly.

The conversion writes into a temporary folder and renames it into place. A file lock lets one
process convert while the others wait (the holder removes the lock file when done); on a
multi-node job, each node converts into its own cache unless the cache is on a shared filesystem.
The cache lives in ``$ADAMOLE_DIST_CACHE/models``, by default ``~/.cache/adamole_dist/models``.

The built-in names (``smollm2-135m``, ``gemma3-270m``) and the packages their GGUFs ship in: builtin_models.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from adamole_dist.base_model.hf_logging import quiet_transformers
from adamole_dist.config.fields import ConfigError
from adamole_dist.local_host import cache_home, readable_by_all
from adamole_dist.progress import bar

log = logging.getLogger(__name__)

DONE = "converted_from.json"  # written last: its presence marks a complete conversion


def cache_root() -> Path:
    return cache_home() / "models"


def is_gguf_name(path: Path) -> bool:
    """A GGUF file by its name: the extension in any case (``model.GGUF`` too)."""
    return path.suffix.lower() == ".gguf"


def find_gguf(model: str) -> Path | None:
    """The GGUF file ``model`` names (a .gguf file, or a folder with one .gguf and no config.json),
    None for anything else."""
    path = Path(model)
    if is_gguf_name(path):
        if not path.is_file():
            raise ConfigError(f"model ({model}) is not a file")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if is_gguf_name(p) and p.is_file())
        if len(found) > 1:
            raise ConfigError(f"model ({model}) holds several GGUF files ({', '.join(p.name for p in found)}); "
                              "name one of them")
        return found[0] if found else None
    return None


def cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


@contextlib.contextmanager
def conversion_lock(path: Path):
    """Hold an exclusive lock on the file ``path`` for the block, and remove the file before letting go,
    so the cache keeps no lock files. A waiter can be granted the lock on a file its holder has just
    removed; it then locks the path's current file instead (else two processes would both hold "the"
    lock: one on the removed file, one on its successor)."""
    while True:
        try:
            lock_file = open(path, "a")
        except OSError as e:
            raise ConfigError(f"model cache ({path.parent}) is not writable: {e}; set ADAMOLE_DIST_CACHE") from None
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # the others wait here
        try:
            held, mine = os.stat(path), os.fstat(lock_file.fileno())
            if (held.st_dev, held.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        lock_file.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while holding it: a waiter on this file then retries on a new one
        lock_file.close()


def converted_folder(gguf: Path, name: str | None = None, chat_template: str | None = None) -> Path:
    """The cached Hugging Face folder converted from ``gguf``, converting it first if needed: one
    process converts, the others wait for it and then find it done. ``chat_template``: Jinja text the
    converted tokenizer carries (for a GGUF without one); it is written at conversion only."""
    root = cache_root()
    dest = root / (name or cache_key(gguf))
    if (dest / DONE).is_file():
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"model cache ({root}) is not writable: {e}; set ADAMOLE_DIST_CACHE") from None
    with conversion_lock(root / f".{dest.name}.lock"):
        if (dest / DONE).is_file():
            return dest
        log.info(f"converting {gguf} into {dest} (once; later runs load the converted folder)")
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dest.name}."))
        try:
            convert(gguf, tmp, chat_template)
            (tmp / DONE).write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
            readable_by_all(tmp)  # a cache shared by several users, or mounted read-only, must be readable
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of an older version
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert(gguf: Path, out: Path, chat_template: str | None = None) -> None:
    """Dequantise ``gguf`` and save model (fp32 safetensors) and tokenizer (with ``chat_template`` when
    given) into ``out``."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"model ({gguf}): reading GGUF files needs the package {package} (make setup)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    # Four stages of seconds each (reading and dequantising the weights is most of it): a bar of the
    # stages on a terminal; transformers' own bars stay off (it would draw them in every process).
    stages = bar(total=4, desc=f"convert {gguf.name}")
    tick = stages.update if stages is not None else (lambda n=1: None)
    try:
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(**where)
                config = AutoConfig.from_pretrained(**where)
                tick()
                dequantised = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
                tick()
        except Exception as e:  # a damaged or foreign file fails in the GGUF reader with many exception types
            raise ConfigError(f"model ({gguf}) cannot be read as GGUF: {type(e).__name__}: {str(e)[:200]}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantised.state_dict(), strict=True)
        tick()
        if chat_template:
            tokenizer.chat_template = chat_template
        with quiet_transformers():
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        tick()
    finally:
        if stages is not None:
            stages.close()
