"""Record formats -> normalised multiple-choice examples, validated before any work.

Two built-in formats, auto-detected from the first record (or forced with ``fmt``):

* ``instruction`` — LLM-Adapters style ``{instruction, input, output, answer}`` (../shared/data).
  The choices' labels come from the "Answer format: a/b/c" line, their texts from the
  "Answer1: ... Answer2: ..." segments (or, without those, the labels themselves: true/false).
  The causal prompt is the Alpaca template followed by the part of ``output`` before the
  answer ("the correct answer is").
* ``mc`` — AdaMoLE-style ``{question, choices, answerKey|answer}`` with ``choices`` either
  ``{"label": [...], "text": [...]}`` (commonsense_qa / ARC layout) or a list of texts (labels
  A, B, C, ...); ``answer`` is a label or an int index. Rendered as
  "Question: ...\\nChoices:\\nA. ...\\nAnswer:".

Free-form (SFT) formats are detected here too and converted by data/conversations.py:
``messages`` {messages: [{role, content}]}, ``sharegpt`` {conversations: [{from, value}]},
``prompt_completion`` {prompt, completion}, ``alpaca`` {instruction, input?, output} (a record
that also has ``answer`` stays multiple-choice ``instruction``) and ``text`` {text}.

Joining rule: the prompt ends right before the answer with no trailing space; each candidate
starts with a space unless the prompt ends in whitespace (e.g. an empty lead-in leaves the
prompt ending in "### Response:\\n"). So ``prompt + candidate`` is always the full text.
"""

from __future__ import annotations

import csv
import os
import random
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from adamole_dist.config.training import MC_DATA_FORMATS, SFT_DATA_FORMATS
from adamole_dist.data.examples import DataError, Example
from adamole_dist.data.json_records import read_json_records, read_text

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
LEAD_INS = (
    "Please choose the correct answer to the question:",
    "Please answer the following question with true or false, question:",
)
REQUIRED = {"instruction": ("instruction", "output", "answer"), "mc": ("question", "choices")}
# Free-form formats in detection order (after the multiple-choice ones: an LLM-Adapters record with
# an ``answer`` field stays ``instruction``); conversations.py validates and normalises them.
SFT_REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",),
                "prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"),
                "text": ("text",)}
MC_FORMATS = tuple(REQUIRED)
SFT_FORMATS = tuple(SFT_REQUIRED)
DATA_FORMATS = MC_FORMATS + SFT_FORMATS  # config.training's data_format choices (besides auto)
assert (set(MC_FORMATS), set(SFT_FORMATS)) == (
    set(MC_DATA_FORMATS), set(SFT_DATA_FORMATS))  # config/ cannot import data/
MC_ANSWER_FIELDS = ("answerKey", "answer")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BUILTIN_PREFIX = "builtin:"

_FORMAT_LINE = re.compile(r"^\s*Answer format:\s*(\S.*?)\s*$", re.MULTILINE)
_ANSWER_SEGMENT = re.compile(r"Answer(\d+):\s*(.*?)(?=\s+Answer\d+:|\s*\n|\s*$)")


# -- loading ------------------------------------------------------------------------------------
def _csv_features(path: Path):
    """All CSV columns as strings: pandas would otherwise turn true/false answers into bools."""
    import datasets

    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty CSV file (no header row)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _read_file(path: Path) -> list[dict]:
    """Records of one local data file: JSON and JSON Lines read as JSON (json_records.py: values as
    written), CSV and Parquet with the ``datasets`` library."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        records = read_json_records(path)
    else:
        records = _read_table(path, suffix)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _read_table(path: Path, suffix: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(50)  # CRITICAL: its own log lines; we say it better
    builder = {".csv": "csv", ".parquet": "parquet"}[suffix]
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if suffix == ".csv":
        read_text(path)  # a byte that is not UTF-8 named with its line and offset, not deep inside pyarrow
    extra = {"features": _csv_features(path), "keep_default_na": False} if suffix == ".csv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **extra)
    except Exception as e:  # datasets raises many exception types for a malformed file
        if "corresponds to no data" in str(e):
            raise DataError(f"{path}: the file holds no records") from None
        raise DataError(f"{path}: could not be read as {builder}: {type(e).__name__}: {str(e)[:300]}") from None
    return ds.to_list()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Quick probe, so an offline machine fails at once instead of after the hub client's retries."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_builtin(source: str, split: str) -> list[dict]:
    from adamole_dist.data.builtin_datasets import builtin_datasets

    known = builtin_datasets()
    name = source[len(BUILTIN_PREFIX):]
    if name not in known:
        names = ", ".join(BUILTIN_PREFIX + b for b in known)
        raise DataError(f"dataset {source!r}: unknown built-in dataset (known: {names})")
    try:
        return known[name](split)
    except ValueError as e:
        raise DataError(f"dataset {source!r}: {e}") from None


def _load_hub(source: str, split: str) -> list[dict]:
    missing = f"dataset {source!r}: no such local file or directory"
    if not _hub_reachable():
        raise DataError(f"{missing}, and the Hugging Face hub is unreachable (offline), "
                        "so it cannot be loaded as a hub id")
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as e:
        raise DataError(f"{missing}, and loading it from the hub failed: "
                        f"{type(e).__name__}: {str(e)[:300]}") from None


def load_records(source: str, split: str) -> tuple[list[dict], str]:
    """(records, origin) of one split. ``source`` is ``builtin:<name>``, a directory holding
    ``{split}.json/.jsonl/.csv/.parquet``, a data file (which *is* the split), or a hub id (tried
    only when no such local path exists). ``origin`` names the file for error messages."""
    if source.startswith(BUILTIN_PREFIX):
        return _load_builtin(source, split), f"{source}[{split}]"
    path = Path(source).expanduser()
    if path.is_dir():
        found = [path / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (path / f"{split}{suffix}").is_file()]
        if len(found) > 1:  # which one is meant cannot be guessed
            raise DataError(f"dataset {source}: split {split!r} is ambiguous: {' and '.join(f.name for f in found)} "
                            "are both in this directory; keep one")
        if found:
            return _read_file(found[0]), str(found[0])
        raise DataError(f"dataset {source}: no {split}.json, .jsonl, .csv or .parquet in this directory")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"dataset {source}: unsupported file type {path.suffix!r} "
                            f"(use {', '.join(DATA_SUFFIXES)})")
        return _read_file(path), str(path)
    return _load_hub(source, split), f"{source}[{split}]"


# -- instruction format ---------------------------------------------------------------------------
def _index_of(answer: str, labels: list[str]) -> int | None:
    """Exact match first, then case-insensitive (a JSON true read as "True")."""
    if answer in labels:
        return labels.index(answer)
    folded = [lb.casefold() for lb in labels]
    return folded.index(answer.casefold()) if answer.casefold() in folded else None


def _choice_texts(instruction: str, n: int) -> list[str] | None:
    """Texts of "Answer1: ... AnswerN: ..." when exactly answers 1..n are present."""
    found = [(int(m.group(1)), m.group(2).strip()) for m in _ANSWER_SEGMENT.finditer(instruction)]
    if [i for i, _ in found] != list(range(1, n + 1)):
        return None
    return [t for _, t in found]


def _question(instruction: str) -> str:
    """The instruction without its fixed lead-in, answer segments and format line."""
    text = _FORMAT_LINE.sub("", instruction)
    first_answer = re.search(r"Answer1:", text)
    if first_answer:
        text = text[: first_answer.start()]
    text = text.strip()
    for lead in LEAD_INS:
        if text.startswith(lead):
            return text[len(lead):].strip()
    return text


def _join(prompt: str, labels: list[str]) -> list[str]:
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return [sep + lb for lb in labels]


def from_instruction(rec: dict, where: str) -> Example:
    instruction, output = str(rec["instruction"]), str(rec["output"]).strip()
    answer = str(rec["answer"]).strip()
    m = _FORMAT_LINE.search(instruction)
    labels = [x.strip() for x in m.group(1).split("/") if x.strip()] if m else []
    if len(labels) < 2:
        raise DataError(f"{where}: field 'instruction' has no 'Answer format: a/b/...' line with two or more choices")
    label = _index_of(answer, labels)
    if label is None:
        raise DataError(f"{where}: field 'answer' ({answer!r}) is not one of the choices {labels} "
                        f"of the instruction's 'Answer format' line")
    texts = _choice_texts(instruction, len(labels)) or list(labels)
    inp = str(rec.get("input") or "").strip()
    if inp:
        prompt = ALPACA_WITH_INPUT.format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA.format(instruction=instruction)
    if output.casefold().endswith(answer.casefold()):
        prompt += output[: len(output) - len(answer)].rstrip()  # the answer lead-in
    candidates = _join(prompt, labels)
    return Example(_question(instruction), texts, prompt, candidates, label, candidates[label])


# -- multiple-choice format -------------------------------------------------------------------------
def _mc_choices(choices, where: str) -> tuple[list[str], list[str]]:
    """(labels, texts) from a {label, text} mapping or a list of texts."""
    if isinstance(choices, dict):
        if not isinstance(choices.get("text"), list):
            raise DataError(f"{where}: field 'choices' must hold a 'text' list (and optionally a 'label' list)")
        texts = [str(t) for t in choices["text"]]
        labels = [str(x).strip() for x in (choices.get("label") or LETTERS[: len(texts)])]
    elif isinstance(choices, list):
        texts, labels = [str(t) for t in choices], list(LETTERS[: len(choices)])
    else:
        raise DataError(f"{where}: field 'choices' must be a list of texts or a {{label, text}} mapping, "
                        f"not {type(choices).__name__}")
    if len(texts) < 2 or len(labels) != len(texts):
        raise DataError(f"{where}: field 'choices' needs at least two choices and one label per choice "
                        f"(got {len(texts)} texts, {len(labels)} labels)")
    return labels, texts


def _mc_label(key, labels: list[str], where: str, field: str) -> int:
    """A label letter/string, or an int index."""
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(labels):
            raise DataError(f"{where}: field {field!r} index {key} is out of range for {len(labels)} choices")
        return key
    idx = _index_of(str(key).strip(), labels)
    if idx is None:
        raise DataError(f"{where}: field {field!r} ({key!r}) is not one of the choice labels {labels}")
    return idx


def from_mc(rec: dict, where: str) -> Example:
    labels, texts = _mc_choices(rec["choices"], where)
    field = next(f for f in MC_ANSWER_FIELDS if rec.get(f) is not None)
    label = _mc_label(rec[field], labels, where, field)
    question = str(rec["question"]).strip()
    lines = "".join(f"{lb}. {t}\n" for lb, t in zip(labels, texts))
    prompt = f"Question: {question}\nChoices:\n{lines}Answer:"
    candidates = _join(prompt, labels)
    return Example(question, texts, prompt, candidates, label, candidates[label])


PARSERS = {"instruction": from_instruction, "mc": from_mc}


# -- validation and conversion ------------------------------------------------------------------------
def detect_format(record: dict, origin: str) -> str:
    """The format of a dataset, from its first record: multiple-choice formats first, then free-form."""
    if not isinstance(record, dict):
        raise DataError(f"{origin} record 0: expected an object with named fields, got {type(record).__name__}")
    for fmt, fields in {**REQUIRED, **SFT_REQUIRED}.items():
        if all(f in record for f in fields):
            return fmt
    sft = "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in SFT_REQUIRED.items())
    raise DataError(f"{origin} record 0: fields {sorted(record)} match no known format "
                    f"(instruction: {', '.join(REQUIRED['instruction'])}; "
                    f"mc: question, choices, answerKey or answer; {sft}; --data_format forces one)")


def resolve_format(records: list, fmt: str, origin: str) -> str:
    """``fmt``, or the format detected from the first record for "auto"."""
    if not records:
        raise DataError(f"{origin}: the dataset is empty")
    if fmt == "auto":
        return detect_format(records[0], origin)
    if fmt not in DATA_FORMATS:
        raise DataError(f"data_format ({fmt!r}) must be one of auto, {', '.join(DATA_FORMATS)}")
    return fmt


def _missing_field(rec: dict, fmt: str) -> str | None:
    for field in REQUIRED[fmt]:
        if rec.get(field) is None:
            return field
    if fmt == "mc" and all(rec.get(f) is None for f in MC_ANSWER_FIELDS):
        return "answerKey"
    return None


def validate(records: list[dict], fmt: str, origin: str) -> None:
    """Every record has the format's fields, checked before any conversion."""
    needs = ", ".join(REQUIRED[fmt]) + (", answerKey (or answer)" if fmt == "mc" else "")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{origin} record {i}: expected an object with fields {needs}, got {type(rec).__name__}")
        field = _missing_field(rec, fmt)
        if field:
            raise DataError(f"{origin} record {i}: missing field {field!r} ({fmt} format needs {needs})")


def to_examples(records: list[dict], fmt: str = "auto", origin: str = "<records>") -> list[Example]:
    """Validate all records (errors name origin, record index and field), then convert them."""
    fmt = resolve_format(records, fmt, origin)
    if fmt in SFT_FORMATS:
        raise DataError(f"{origin}: {fmt} records are free-form (no choices to score); this path takes "
                        f"multiple-choice data ({', '.join(MC_FORMATS)}); the trainer takes both")
    validate(records, fmt, origin)
    return [PARSERS[fmt](rec, f"{origin} record {i}") for i, rec in enumerate(records)]


def subsample(examples: list, limit: int | None, seed: int = 0) -> list:
    """A seeded random subset of ``limit`` items in their original order (all when limit is 0/None)."""
    if limit is not None and limit < 0:
        raise DataError(f"limit ({limit}) must be >= 0 (0 or None = all examples)")
    if not limit or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def load_examples(source: str, split: str, fmt: str = "auto", limit: int | None = None,
                  seed: int = 0) -> list[Example]:
    """Load, validate and convert one split; ``limit`` takes a deterministic subsample."""
    records, origin = load_records(source, split)
    return subsample(to_examples(records, fmt, origin), limit, seed)
