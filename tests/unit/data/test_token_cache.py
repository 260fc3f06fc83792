"""The token cache: rank 0 tokenises once into a folder every rank memory-maps; a hit skips the
tokenisation, a changed key rebuilds, a bad record fails on every rank, a failed or killed build
leaves nothing a later run would trust."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from adamole_dist.data.examples import IGNORE
from adamole_dist.data.formats import DataError
from adamole_dist.data.token_cache import (
    INFO_FILE,
    cache_info,
    cache_key,
    data_fingerprint,
    default_cache_dir,
    key_digest,
    tokenized_split,
    tokenizer_identity,
)


# -- a toy tokenizer: word lengths as ids, every call counted in a file (works across processes) ---
def toy_tokenize(record: dict, calls: str, crash_at: str | None = None, delay_s: float = 0.0) -> dict | None:
    with open(calls, "a") as f:
        f.write("x\n")
    time.sleep(delay_s)
    if record.get("bad"):
        raise DataError(f"field 'text' ({record['text']!r}) is not allowed")
    if crash_at is not None and record["text"] == crash_at:
        os._exit(3)  # a killed build: no exception handler, no cleanup
    ids = [len(word) + 10 * (i % 3) for i, word in enumerate(record["text"].split())]
    if len(ids) > 8:
        return None  # dropped, as a renderer's truncation policy would
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


def calls(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def toy_records(n: int = 23) -> list[dict]:
    return [{"text": " ".join("w" * (1 + (i * j) % 5) for j in range(1 + i % 6)), "id": i} for i in range(n)]


def plain(records: list[dict], tmp_path: Path) -> list[dict]:
    """The reference: the toy tokenizer over a list, no datasets involved."""
    out = []
    for r in records:
        ex = toy_tokenize(r, str(tmp_path / "plain_calls"))
        if ex is not None:
            out.append({**ex, "length": len(ex["input_ids"])})
    return out


KEY = {"data": "toy", "max_length": 8}


def build(records, tmp_path, key=KEY, num_proc=1, **kw):
    fn = functools.partial(toy_tokenize, calls=str(tmp_path / "calls"), **kw)
    return tokenized_split(records, fn, cache_key=key, cache_dir=tmp_path / "cache",
                           num_proc=num_proc, origin="toy.jsonl")


def cache_entries(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- fast -------------------------------------------------------------------------------------------
def test_build_then_hit_equals_plain_tokenisation(tmp_path):
    records = toy_records()
    ds = build(records, tmp_path)
    assert calls(tmp_path / "calls") == len(records)
    assert ds.cache_files, "not memory-mapped from the cache folder"
    assert all(str(tmp_path / "cache") in f["filename"] for f in ds.cache_files)
    assert ds.to_list() == plain(records, tmp_path)
    assert ds[3] == plain(records, tmp_path)[3]

    again = build(records, tmp_path)
    assert calls(tmp_path / "calls") == len(records), "a cache hit must not tokenise again"
    assert again.to_list() == ds.to_list()
    info = cache_info(again)
    assert info["key"]["data"] == "toy" and info["examples"] == len(ds) and info["records"] == len(records)
    assert len(cache_entries(tmp_path)) == 1


def test_dropped_records_are_counted(tmp_path):
    records = toy_records() + [{"text": " ".join(["w"] * 9), "id": 99}]
    ds = build(records, tmp_path)
    info = cache_info(ds)
    assert info["dropped"] == 1 and info["examples"] == len(records) - 1 == len(ds)


def test_key_change_rebuilds(tmp_path):
    records = toy_records()
    build(records, tmp_path)
    ds = build(records, tmp_path, key={**KEY, "max_length": 9})
    assert calls(tmp_path / "calls") == 2 * len(records)
    assert len(cache_entries(tmp_path)) == 2
    assert cache_info(ds)["key"]["max_length"] == 9


def test_num_proc_2_equals_one_process_and_dataset_input(tmp_path):
    import datasets

    records = toy_records(40)
    ds = build(datasets.Dataset.from_list(records), tmp_path, num_proc=2)
    assert calls(tmp_path / "calls") == len(records)
    assert ds.to_list() == plain(records, tmp_path)


def test_records_reach_the_tokenizer_as_given(tmp_path):
    """Arrow would give every record every field (missing ones None); the tokenize function must
    see each record exactly as it was."""
    seen = tmp_path / "seen.jsonl"
    records = [{"text": "a b"}, {"text": "c d e", "extra": {"k": [1, 2]}}]
    tokenized_split(records, functools.partial(_record_echo, seen=str(seen)), cache_key=KEY,
                    cache_dir=tmp_path / "cache")
    assert [json.loads(line) for line in seen.read_text().splitlines()] == records


def _record_echo(record: dict, seen: str) -> dict:
    with open(seen, "a") as f:
        f.write(json.dumps(record) + "\n")
    return {"input_ids": [1, 2], "labels": [IGNORE, 2]}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_data_error_surfaces_and_leaves_no_cache(tmp_path, num_proc):
    records = toy_records()
    records[17] = {"text": "oops", "bad": True}
    with pytest.raises(DataError, match=r"toy\.jsonl record 17: field 'text' \('oops'\) is not allowed"):
        build(records, tmp_path, num_proc=num_proc)
    assert cache_entries(tmp_path) == [], "a failed build left files behind"
    records[17] = {"text": "fine now"}
    assert len(build(records, tmp_path)) == len(records)


def test_tokenizer_contract_is_checked(tmp_path):
    bad = functools.partial(_labels_too_short)
    with pytest.raises(ValueError, match=r"record 0: .*2 input_ids and 1 labels"):
        tokenized_split([{"text": "a"}], bad, cache_key=KEY, cache_dir=tmp_path / "cache")
    assert cache_entries(tmp_path) == []


def _labels_too_short(record: dict) -> dict:
    return {"input_ids": [1, 2], "labels": [IGNORE]}


def _killed_build(records, tmp_path):
    build(records, tmp_path, crash_at=records[12]["text"])


def test_killed_build_leaves_nothing_trusted(tmp_path):
    records = toy_records()
    proc = multiprocessing.get_context("spawn").Process(target=_killed_build, args=(records, tmp_path))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    assert 0 < calls(tmp_path / "calls") < len(records)
    leftovers = cache_entries(tmp_path)
    assert all(name.startswith(".") for name in leftovers), leftovers  # only the hidden temporary
    before = calls(tmp_path / "calls")
    ds = build(records, tmp_path)
    assert calls(tmp_path / "calls") - before == len(records), "the killed build's files were trusted"
    assert ds.to_list() == plain(records, tmp_path)
    assert [name for name in cache_entries(tmp_path) if name.startswith(".")] == [], "the dead build's files stay"


def test_data_fingerprint_follows_content(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "x"}\n')
    assert data_fingerprint(a) == data_fingerprint(b)  # content, not the path
    assert data_fingerprint(a).endswith(f":{a.stat().st_size}")
    b.write_text('{"text": "y"}\n')
    assert data_fingerprint(a) != data_fingerprint(b)
    assert data_fingerprint("builtin:word_categories") == "name:builtin:word_categories"


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_cache_key_changes_with_every_input():
    tok = _word_tokenizer(["a", "b"])
    base = {"data_fingerprint": "sha256:0:1", "tokenizer": tok, "chat_template": "{{ x }}", "max_length": 16,
            "packing": False, "data_format": "messages", "loss_on": "assistant"}
    key = cache_key(**base)
    assert key == cache_key(**base) and key == cache_key(**{**base, "tokenizer": _word_tokenizer(["a", "b"])})
    json.dumps(key)  # human readable in cache.json
    variants = {"data_fingerprint": "sha256:1:1", "tokenizer": _word_tokenizer(["a", "c"]), "chat_template": None,
                "max_length": 17, "packing": True, "data_format": "sharegpt", "loss_on": "all"}
    digests = {key_digest(cache_key(**{**base, field: value})) for field, value in variants.items()}
    assert key_digest(key) not in digests and len(digests) == len(variants)
    assert key_digest(cache_key(**base, truncation="drop")) != key_digest(key)
    assert tokenizer_identity(tok)["sha256"] != tokenizer_identity(_word_tokenizer(["b", "a"]))["sha256"]


def test_default_cache_dir_follows_the_project_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMOLE_DIST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tokenized"
    monkeypatch.delenv("ADAMOLE_DIST_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "adamole_dist" / "tokenized"


def test_cache_json_is_written_inside_the_folder(tmp_path):
    ds = build(toy_records(), tmp_path)
    [name] = cache_entries(tmp_path)
    info = json.loads((tmp_path / "cache" / name / INFO_FILE).read_text())
    assert info == cache_info(ds) and info["key"]["tokenize_fn"]["name"].endswith("toy_tokenize")


def test_a_complete_cache_is_read_anywhere_without_writing(tmp_path, monkeypatch):
    """Issue 40, case 15: a cache built once (by another user, on a login node) and then read where nothing
    may be written (a read-only mount): its folders readable by all (mkdtemp made them 0700), its key free
    of paths (a copy elsewhere still hits: a tokenizer is known by its content, not its folder), and a hit
    writes nothing."""
    import errno
    import shutil
    import stat
    import tempfile

    from tests.helpers.tiny_models import minilm_tokenizer

    old_umask = os.umask(0o022)
    try:
        records = toy_records()
        build(records, tmp_path)
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "cache").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044 and (not path.is_dir() or mode & 0o011 == 0o011), (path, oct(mode))
    for folder in ("a", "b"):
        minilm_tokenizer().save_pretrained(tmp_path / folder)
    from transformers import AutoTokenizer

    idents = [tokenizer_identity(AutoTokenizer.from_pretrained(tmp_path / f)) for f in ("a", "b")]
    assert idents[0] == idents[1]

    shutil.copytree(tmp_path / "cache", tmp_path / "elsewhere")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    for module, name in ((tempfile, "mkdtemp"), (os, "replace"), (os, "mkdir"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, read_only)
    fn = functools.partial(toy_tokenize, calls=str(tmp_path / "calls"))
    again = tokenized_split(records, fn, cache_key=KEY, cache_dir=tmp_path / "elsewhere", origin="toy.jsonl")
    monkeypatch.undo()
    assert calls(tmp_path / "calls") == len(records), "a hit must not tokenise again"
    assert again.to_list() == plain(records, tmp_path)


def test_a_split_all_dropped_is_named_on_reading(tmp_path):
    """Issue 40, case 4: every record dropped -- the cache of no examples (Arrow writes no data file for no
    rows) raised IndexError on loading; now NoExamples, with the count, when built and on a hit."""
    from adamole_dist.data.token_cache import NoExamples

    records = [{"text": " ".join(["w"] * 9)}] * 5  # longer than the toy tokenizer keeps
    for _ in range(2):  # the build, then the hit
        with pytest.raises(NoExamples, match="toy.jsonl: the tokenize function dropped all 5 records") as e:
            build(records, tmp_path)
        assert e.value.records == 5
    assert calls(tmp_path / "calls") == 5


# -- slow: 2 gloo ranks -------------------------------------------------------------------------------
def _two_ranks(rank: int, world: int, tmp_path: Path, records: list[dict], bad: bool) -> None:
    fn = functools.partial(toy_tokenize, calls=str(tmp_path / "calls"), delay_s=0.02)  # outlasts a few polls
    from adamole_dist.parallel.rank_zero import CollectiveRanks

    common = {"cache_key": KEY, "cache_dir": tmp_path / "cache", "ranks": CollectiveRanks(rank, world), "num_proc": 2,
              "origin": "toy.jsonl", "poll_s": 0.2}
    if bad:
        with pytest.raises(DataError, match=r"toy\.jsonl record 5: field 'text'"):
            tokenized_split(records, fn, **common)
        return
    ds = tokenized_split(records, fn, **common)
    assert ds.cache_files
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(ds.to_list()))


@pytest.mark.slow
def test_two_gloo_ranks_tokenise_once_and_see_the_same_examples(tmp_path):
    from tests.helpers.mp_harness import run_ranks

    records = toy_records(50)
    run_ranks(_two_ranks, 2, tmp_path, records, False, timeout=180)
    assert calls(tmp_path / "calls") == len(records), "tokenised more than once"
    expected = plain(records, tmp_path)
    assert json.loads((tmp_path / "rank0.json").read_text()) == expected
    assert json.loads((tmp_path / "rank1.json").read_text()) == expected

    bad = list(records)
    bad[5] = {"text": "nope", "bad": True}
    (tmp_path / "bad").mkdir()
    run_ranks(_two_ranks, 2, tmp_path / "bad", bad, True, timeout=180)  # both ranks raise; none hangs
    assert cache_entries(tmp_path / "bad") == []


def _long_build(rank: int, world: int, tmp_path: Path, records: list[dict]) -> None:
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d._set_pg_timeout(timedelta(seconds=2))  # one collective waiting out the whole build would fail
    fn = functools.partial(toy_tokenize, calls=str(tmp_path / "calls"), delay_s=0.25)  # about 5 s
    from adamole_dist.parallel.rank_zero import CollectiveRanks

    ds = tokenized_split(records, fn, cache_key=KEY, cache_dir=tmp_path / "cache", ranks=CollectiveRanks(rank, world),
                         num_proc=1, poll_s=0.5)
    assert len(ds) == len(records)


@pytest.mark.slow
def test_waiting_ranks_outlast_the_collective_timeout(tmp_path):
    from tests.helpers.mp_harness import run_ranks

    records = toy_records(20)
    run_ranks(_long_build, 2, tmp_path, records, timeout=120)
    assert calls(tmp_path / "calls") == len(records)
