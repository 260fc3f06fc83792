"""Tokenise a split once, into an on-disk cache that every rank memory-maps.

:func:`tokenized_split` runs the tokenize function over the records with ``datasets.Dataset.map``
(``num_proc`` workers) on rank 0 only and saves the result with ``save_to_disk`` into
``cache_dir/<sha256 of the key>/data``; ``cache.json`` beside it records the key and the counts.
Every rank then opens it with ``load_from_disk``: memory-mapped Arrow, so no rank holds the
corpus as Python lists, and a later run with the same key skips the tokenisation.

Why the key also names the tokenize function's code: changing the renderer must not hand back
tokens an older renderer produced, so the key holds a hash of the function's source file.

Crash safety: the build writes into a hidden temporary folder beside its destination and renames
it into place once ``cache.json`` is written, so a cache folder either is complete or does not
exist; a killed build leaves only a ``.<key>.tmp-<host>-<pid>-*`` folder that no run reads, and
the next build of that key on the same host removes it once its process is gone.

Waiting ranks: rank 0 tokenises while the others wait in short collectives of ``poll_s`` seconds
instead of one barrier that a long tokenisation would time out (the process group's timeout is 10
minutes): ``ranks.rank0_decides`` (data/ranks.py; parallel/rank_zero.py in a distributed job). The
outcome (the cache folder, or the DataError a record raised) reaches every rank the same way.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.examples import IGNORE, DataError
from adamole_dist.data.formats import BUILTIN_PREFIX, load_records
from adamole_dist.data.ranks import INPUT_ERRORS, ONE_PROCESS, Ranks
from adamole_dist.local_host import cache_home, process_alive, readable_by_all
from adamole_dist.progress import datasets_bars

log = logging.getLogger(__name__)


class NoExamples(DataError):
    """The tokenize function dropped every record of the split (its length policy): nothing to train on."""

    def __init__(self, origin: str, records: int) -> None:
        super().__init__(f"{origin}: the tokenize function dropped all {records} records")
        self.origin, self.records = origin, records

# Bump when the layout of a cache folder or the meaning of its columns changes.
CODE_VERSION = "token_cache/1"
INFO_FILE = "cache.json"  # inside the cache folder; written before the folder is renamed into place
DATA_DIR = "data"  # save_to_disk output
RECORD_COLUMN = "record_json"  # list input: one JSON string a record (Arrow would fill missing keys with None)


def default_cache_dir() -> Path:
    """``$ADAMOLE_DIST_CACHE/tokenized``, by default ``~/.cache/adamole_dist/tokenized``."""
    return cache_home() / "tokenized"


# -- the key --------------------------------------------------------------------------------------
def data_fingerprint(source: str | os.PathLike) -> str:
    """A content hash of a local data file (or of every file under a folder, with their relative
    names): ``sha256:<hex>:<bytes>``, read in 1 MiB chunks. A copy of the file elsewhere hashes the
    same. A generated built-in split (``builtin:NAME[SPLIT]``) hashes its records, so a version of the package
    that generates them differently does not reuse a cache of the old ones. A hub id cannot be hashed here
    and is named instead. Pass the split's file (formats.load_records' ``origin``), not its folder, so
    editing another split does not invalidate this one."""
    if str(source).startswith(BUILTIN_PREFIX):
        return builtin_fingerprint(str(source))
    path = Path(source).expanduser()
    if path.is_file():
        files = [(path, "")]
    elif path.is_dir():
        files = [(p, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    else:
        return f"name:{source}"
    # The same files unchanged (size and modification time) hash the same: the token cache and --resume's
    # data check both ask, and a large split is read once.
    seen = tuple((str(f.resolve()), name, f.stat().st_size, f.stat().st_mtime_ns) for f, name in files)
    if seen not in _FINGERPRINTS:
        digest, total = hashlib.sha256(), 0
        for file, name in files:
            digest.update(name.encode() + b"\0")
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
        _FINGERPRINTS[seen] = f"sha256:{digest.hexdigest()}:{total}"
    return _FINGERPRINTS[seen]


_FINGERPRINTS: dict[tuple | str, str] = {}  # (files) or a built-in split's origin


def builtin_fingerprint(origin: str) -> str:
    """``sha256:<hex>:<bytes>`` of a built-in split's records as JSON (``builtin:NAME[SPLIT]``, or a bare
    ``builtin:NAME``: named only, as there is no split to generate)."""
    name, _, split = origin.partition("[")
    if not split.endswith("]"):
        return f"name:{origin}"
    if origin not in _FINGERPRINTS:
        records, _ = load_records(name, split[:-1])
        text = json.dumps(records, sort_keys=True).encode()
        _FINGERPRINTS[origin] = f"sha256:{hashlib.sha256(text).hexdigest()}:{len(text)}"
    return _FINGERPRINTS[origin]


def tokenizer_identity(tokenizer) -> dict:
    """A hash of what decides the token ids: the fast tokenizer's full serialisation (vocab, merges,
    normalizer, pre-/post-processor, added tokens) or, for a slow one, its vocabulary, plus the special
    tokens. Not where the tokenizer lies: a converted model's folder is inside the cache
    ($ADAMOLE_DIST_CACHE/models), so a cache copied or mounted elsewhere would miss every key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\0{content}\0{specials}".encode()).hexdigest()
    return {"sha256": digest}


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def cache_key(*, data_fingerprint: str, tokenizer, chat_template: str | None, max_length: int, packing: bool,
              data_format: str, loss_on: str, **extra) -> dict:
    """The dict :func:`tokenized_split` keys its cache by. ``tokenizer``: a tokenizer, or the dict
    :func:`tokenizer_identity` made of one. ``extra``: any other option the tokenisation depends on
    (truncation policy, alpaca_as_chat, ...); JSON-serialisable values."""
    ident = tokenizer if isinstance(tokenizer, dict) else tokenizer_identity(tokenizer)
    return {"code_version": CODE_VERSION, "data": data_fingerprint, "tokenizer": ident,
            "chat_template_sha256": text_hash(chat_template), "max_length": int(max_length),
            "packing": bool(packing), "data_format": data_format, "loss_on": loss_on, **extra}


def key_digest(key: dict) -> str:
    """sha256 of the canonical JSON of ``key`` (sorted keys, no whitespace): the cache folder's name."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_identity(fn: Callable) -> dict:
    """The tokenize function's qualified name and a hash of its module's source file (through a
    functools.partial); no hash when the source cannot be found (then only the name counts)."""
    while hasattr(fn, "func"):  # functools.partial, possibly nested
        fn = fn.func
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
    try:
        source = Path(inspect.getsourcefile(target)).read_bytes()
    except (TypeError, OSError):
        return {"name": name, "source_sha256": None}
    return {"name": name, "source_sha256": hashlib.sha256(source).hexdigest()}


# -- tokenising -----------------------------------------------------------------------------------
def _named(error: DataError, origin: str, index: int) -> DataError:
    """The error naming its record: tokenize functions see a record, not its index."""
    message = str(error)
    return DataError(message if f"record {index}" in message else f"{origin} record {index}: {message}")


def _checked(example: Any, origin: str, index: int) -> dict:
    """A tokenize function's result, checked against the shared example contract (interfaces.md):
    a bug in a renderer fails here, naming the record, not later in a collate."""
    if not isinstance(example, dict) or "input_ids" not in example or "labels" not in example:
        raise TypeError(f"{origin} record {index}: the tokenize function returned {type(example).__name__}, "
                        "not a dict with input_ids and labels")
    ids, labels = list(example["input_ids"]), list(example["labels"])
    if not ids or len(ids) != len(labels) or labels[0] != IGNORE:
        raise ValueError(f"{origin} record {index}: the tokenize function returned {len(ids)} input_ids and "
                         f"{len(labels)} labels (need the same number, at least one, the first label {IGNORE})")
    return {"input_ids": ids, "labels": labels}


class _TokenizeBatch:
    """The map function: a batch of records -> columns input_ids, labels, length. A record the
    tokenize function returns None for (dropped by its truncation policy) yields no row."""

    def __init__(self, tokenize_fn: Callable, columns: list[str], origin: str,
                 record_indices: list[int] | None = None) -> None:
        self.tokenize_fn, self.columns, self.origin = tokenize_fn, columns, origin
        self.record_indices = record_indices  # a subsample's indices in its file: errors name those

    def records(self, batch: dict) -> list[dict]:
        if self.columns == [RECORD_COLUMN]:
            return [json.loads(text) for text in batch[RECORD_COLUMN]]
        return [dict(zip(self.columns, values)) for values in zip(*(batch[c] for c in self.columns))]

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        for index, record in zip(indices, self.records(batch)):
            if self.record_indices is not None:
                index = self.record_indices[index]
            try:
                example = self.tokenize_fn(record)
            except DataError as e:
                raise _named(e, self.origin, index) from None
            if example is None:
                continue
            example = _checked(example, self.origin, index)
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["length"].append(len(example["input_ids"]))
        return out


def _features():
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32")),
                              "length": datasets.Value("int32")})


def _as_dataset(records):
    """(a Dataset of the records, its columns). A list of dicts becomes one JSON column: records
    reach the tokenize function exactly as given (Arrow would unify their fields)."""
    import datasets

    if isinstance(records, datasets.Dataset):
        return records, list(records.column_names)
    texts = [json.dumps(r, ensure_ascii=False) for r in records]
    return datasets.Dataset.from_dict({RECORD_COLUMN: texts}), [RECORD_COLUMN]


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-"


def _remove_dead_builds(dest: Path) -> None:
    """Remove the temporaries of killed builds of ``dest`` on this host (their process is gone)."""
    host = socket.gethostname()
    for tmp in dest.parent.glob(_tmp_prefix(dest) + "*"):
        owner = tmp.name[len(_tmp_prefix(dest)):].rsplit("-", 2)  # host, pid, mkdtemp's random part
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not process_alive(int(owner[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def _build_folder(dest: Path) -> Path:
    """A fresh hidden temporary beside ``dest``, named for this host and process (after removing the
    temporaries of killed builds); ConfigError when the cache folder is not writable."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(dest)
        owner = f"{socket.gethostname()}-{os.getpid()}-"
        return Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_prefix(dest) + owner))
    except OSError as e:
        raise ConfigError(f"token cache ({dest.parent}) is not writable: {e}; set ADAMOLE_DIST_CACHE to a writable "
                          "folder, or --no-token_cache tokenizes in memory") from None


def _tokenize_into(tmp: Path, source, columns: list[str], tokenize_fn: Callable, num_proc: int, origin: str,
                   record_indices: list[int] | None, fingerprint: str) -> tuple[int, int]:
    """``source`` tokenized and saved into ``tmp/DATA_DIR``; (examples, map workers)."""
    (tmp / "map").mkdir()
    workers = max(1, min(int(num_proc), len(source)))
    with datasets_bars():  # its map's bar on a terminal (rank 0); carriage-return noise in a log file
        mapped = source.map(_TokenizeBatch(tokenize_fn, columns, origin, record_indices),
                            batched=True, with_indices=True, desc="tokenise",
                            remove_columns=columns, features=_features(), num_proc=workers if workers > 1 else None,
                            cache_file_name=str(tmp / "map" / "tokens.arrow"), load_from_cache_file=False,
                            new_fingerprint=fingerprint)  # no dill hashing of the tokenize function
        mapped.save_to_disk(str(tmp / DATA_DIR))
    examples = len(mapped)
    del mapped  # let go of the map's files before removing them
    shutil.rmtree(tmp / "map")
    return examples, workers


def _put_in_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``: a folder there without cache.json is not ours to trust
    (never produced by a completed build) and goes; one with it is another job's build of the same key."""
    readable_by_all(tmp)
    if dest.exists() and not (dest / INFO_FILE).is_file():
        shutil.rmtree(dest)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not (dest / INFO_FILE).is_file():
            raise
        # another job built the same key meanwhile: same key, same content; keep theirs


def _build(records, tokenize_fn: Callable, key: dict, dest: Path, num_proc: int, origin: str,
           record_indices: list[int] | None = None) -> None:
    """Tokenise ``records`` into ``dest`` (see the module docstring for the atomic protocol)."""
    tmp = _build_folder(dest)
    # A stop signal ends the process where it stands; when the build runs in rank 0's worker thread
    # (ranks.rank0_decides with poll_s), the finally below never runs there, so exit removes it too.
    remove_at_exit = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    atexit.register(remove_at_exit)
    try:
        source, columns = _as_dataset(records)
        if len(source) == 0:
            raise DataError(f"{origin}: the dataset is empty")
        log.info(f"tokenizing {len(source)} records of {origin} into {dest} "
                 f"(once; later runs with the same data and settings reuse it)")
        t0 = time.perf_counter()
        examples, workers = _tokenize_into(tmp, source, columns, tokenize_fn, num_proc, origin, record_indices,
                                           dest.name[:32])
        info = {"key": key, "origin": origin, "records": len(source), "examples": examples,
                "dropped": len(source) - examples, "seconds": round(time.perf_counter() - t0, 3),
                "num_proc": workers, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _put_in_place(tmp, dest)
        log.info(f"tokenized {examples} examples ({len(source) - examples} dropped) in {info['seconds']:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        atexit.unregister(remove_at_exit)


def _is_complete(dest: Path, key: dict) -> bool:
    try:
        return json.loads((dest / INFO_FILE).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


# -- the split, on every rank -------------------------------------------------------------------
def tokenized_split(records, tokenize_fn: Callable[[dict], dict | None], *, cache_key: dict,
                    cache_dir: str | os.PathLike | None = None, ranks: Ranks = ONE_PROCESS,
                    num_proc: int = 1, origin: str = "<records>", poll_s: float = 2.0):
    """The tokenized examples of one split, as a memory-mapped ``datasets.Dataset`` (columns
    input_ids, labels, length; ``ds[i]`` is a dict), the same on every rank.

    records: the split's records (a list of dicts or a Dataset); only rank 0 reads them, so other
        ranks may pass None. Or a function of no arguments that returns them, or ``(records,
        indices)`` for a subsample (the records' indices in ``origin``, which errors then name):
        rank 0 calls it only on a cache miss, so a hit reads no record at all.
        tokenize_fn: record -> {"input_ids", "labels"} or None to drop the
        record; picklable when num_proc > 1 (a functools.partial of a module-level function); a
        DataError it raises reaches every rank, naming ``origin`` and the record index.
    cache_key: what the tokens depend on (:func:`cache_key`); the tokenize function's code is added.
    cache_dir: default ``$ADAMOLE_DIST_CACHE/tokenized``; it must be one filesystem all ranks see.
    ranks: the job's ranks (data/ranks.py); every rank must call this (collective with more than one).
    NoExamples (a DataError), on every rank, when the tokenize function dropped every record. A hit
    writes nothing, so a complete cache may be read-only."""
    import datasets

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def ensure_built() -> str:
        key = {**cache_key, "tokenize_fn": code_identity(tokenize_fn)}
        dest = cache_dir / key_digest(key)
        if _is_complete(dest, key):
            log.info(f"token cache hit: {dest}")
        else:
            loaded = records() if callable(records) else records
            rows, indices = loaded if isinstance(loaded, tuple) else (loaded, None)
            if rows is None:
                raise ValueError("tokenized_split: rank 0 needs the records")
            _build(rows, tokenize_fn, key, dest, num_proc, origin, indices)
        return str(dest)

    dest = Path(ranks.rank0_decides(ensure_built, expected=INPUT_ERRORS, poll_s=poll_s))
    seen = ranks.all_gather_objects((dest / INFO_FILE).is_file()) if ranks.world_size > 1 else [True]
    if not all(seen):
        missing = [r for r, ok in enumerate(seen) if not ok]
        raise ConfigError(f"token cache ({dest}): ranks {missing} cannot see the cache rank 0 built; "
                          "set ADAMOLE_DIST_CACHE to a folder every node shares")
    info = json.loads((dest / INFO_FILE).read_text())
    if info["examples"] == 0:  # saved without a data file (Arrow writes none for no rows): nothing to map
        raise NoExamples(origin, info["records"])
    return datasets.load_from_disk(str(dest / DATA_DIR))


def cache_info(dataset) -> dict:
    """The cache.json of a dataset :func:`tokenized_split` returned (key, records, examples,
    dropped, seconds, ...)."""
    files = getattr(dataset, "cache_files", None) or []
    if not files:
        raise ValueError("cache_info: the dataset is not backed by a token cache folder")
    return json.loads((Path(files[0]["filename"]).parent.parent / INFO_FILE).read_text())
