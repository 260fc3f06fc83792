"""Record formats -> normalised multiple-choice examples, validated before any work.

Two built-in formats (auto-detected from the first record):

* ``instruction`` — LLM-Adapters style ``{instruction, input, output, answer}`` as in
  ../shared/data: the choices' labels come from the "Answer format: a/b/c" line, their texts
  from "Answer1: ... Answer2: ..." (or the labels themselves, e.g. true/false).
* ``mc`` — AdaMoLE-style ``{question, choices, answerKey|answer}`` with ``choices`` either
  ``{"label": [...], "text": [...]}`` or a list of texts (labels A, B, C ...); rendered as
  "Question: ...\\nChoices:\\nA. ...\\nAnswer:".

The causal-LM prompt ends right before the answer; each candidate carries its own leading
space when the prompt does not end in whitespace, so ``prompt + candidate`` is the text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
LEAD_INS = (
    "Please choose the correct answer to the question:",
    "Please answer the following question with true or false, question:",
)
FORMAT_FIELDS = {"instruction": ("instruction", "output", "answer"), "mc": ("question", "choices")}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A dataset is missing, malformed or lacks a required field; the message names file and field."""


@dataclass
class Example:
    context: str  # the bare question, which an encoder scores each choice text against
    choice_texts: list[str]  # the choices' texts (encoder pair scoring)
    prompt: str  # causal-LM text up to the answer
    candidates: list[str]  # causal-LM continuations, one per choice
    label: int  # index of the correct choice
    target: str  # causal-LM training target appended to prompt (the correct candidate)


# -- loading ----------------------------------------------------------------------------------
def _load_file(path: Path) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many types for a malformed file
        raise DataError(f"{path}: could not be read as {builder}: {e}") from None
    return ds.to_list()


def load_records(source: str, split: str) -> tuple[list[dict], str]:
    """(records, origin) from builtin:<name>, a directory of {split}.<ext>, a file, or a hub id."""
    if source.startswith("builtin:"):
        from .synthetic import BUILTIN

        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise DataError(f"dataset {source!r}: unknown built-in (have: {', '.join('builtin:' + b for b in BUILTIN)})")
        return BUILTIN[name](split), source
    path = Path(source)
    if path.is_dir():
        for suffix in DATA_SUFFIXES:
            f = path / f"{split}{suffix}"
            if f.is_file():
                return _load_file(f), str(f)
        raise DataError(f"dataset {source}: no {split}.json/.jsonl/.csv/.parquet in this directory")
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"dataset {source}: unsupported file type (use {', '.join(DATA_SUFFIXES)})")
        return _load_file(path), str(path)
    try:
        import datasets

        return datasets.load_dataset(source, split=split).to_list(), f"{source}[{split}]"
    except Exception as e:
        raise DataError(f"dataset {source!r} is not a local file or directory, and loading it from the hub "
                        f"failed ({type(e).__name__}: {str(e)[:200]})") from None


# -- instruction format -------------------------------------------------------------------------
def _answer_labels(instruction: str) -> list[str] | None:
    m = re.search(r"Answer format:\s*(\S.*?)\s*$", instruction, flags=re.MULTILINE)
    return [x.strip() for x in m.group(1).split("/") if x.strip()] if m else None


def _answer_texts(instruction: str) -> list[str]:
    line = next((ln for ln in instruction.split("\n") if re.match(r"\s*Answer1:", ln)), "")
    parts = re.split(r"\s*Answer\d+:\s*", line)
    return [p.strip() for p in parts[1:]]


def _question(instruction: str) -> str:
    text = instruction.split("\n\n")[0].strip()
    for lead in LEAD_INS:
        if text.startswith(lead):
            return text[len(lead):].strip()
    return text


def _join(prompt: str, labels: list[str]) -> list[str]:
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return [sep + c for c in labels]


def from_instruction(rec: dict, where: str) -> Example:
    instruction, output, answer = str(rec["instruction"]), str(rec["output"]), str(rec["answer"]).strip()
    labels = _answer_labels(instruction)
    if not labels:
        raise DataError(f"{where}: field 'instruction' has no 'Answer format: a/b/...' line to take choices from")
    if answer not in labels:
        raise DataError(f"{where}: field 'answer' ({answer!r}) is not one of the choices {labels}")
    texts = _answer_texts(instruction)
    if len(texts) != len(labels):
        texts = list(labels)
    inp = str(rec.get("input") or "").strip()
    prompt = (ALPACA_WITH_INPUT.format(instruction=instruction, input=inp) if inp
              else ALPACA.format(instruction=instruction))
    lead = output[: -len(answer)].rstrip() if output.endswith(answer) else ""
    prompt += lead
    candidates = _join(prompt, labels)
    label = labels.index(answer)
    return Example(_question(instruction), texts, prompt, candidates, label, candidates[label])


# -- multiple-choice format -----------------------------------------------------------------------
def from_mc(rec: dict, where: str) -> Example:
    choices = rec["choices"]
    if isinstance(choices, dict):
        if "text" not in choices:
            raise DataError(f"{where}: field 'choices' must hold 'text' (and optionally 'label') lists")
        texts = [str(t) for t in choices["text"]]
        labels = [str(x) for x in choices.get("label") or LETTERS[: len(texts)]]
    elif isinstance(choices, list):
        texts, labels = [str(t) for t in choices], list(LETTERS[: len(choices)])
    else:
        raise DataError(f"{where}: field 'choices' must be a list or a {{label, text}} mapping")
    if len(texts) < 2 or len(labels) != len(texts):
        raise DataError(f"{where}: field 'choices' needs at least two choices with one label each")
    key = rec.get("answerKey", rec.get("answer"))
    if key is None:
        raise DataError(f"{where}: missing field 'answerKey' (or 'answer')")
    if isinstance(key, int) and not isinstance(key, bool):
        label = key
    elif str(key).strip() in labels:
        label = labels.index(str(key).strip())
    else:
        raise DataError(f"{where}: answer {key!r} is not one of the labels {labels}")
    if not 0 <= label < len(texts):
        raise DataError(f"{where}: answer index {label} is out of range for {len(texts)} choices")
    question = str(rec["question"]).strip()
    prompt = f"Question: {question}\nChoices:\n" + "".join(f"{lb}. {t}\n" for lb, t in zip(labels, texts)) + "Answer:"
    candidates = _join(prompt, labels)
    return Example(question, texts, prompt, candidates, label, candidates[label])


PARSERS = {"instruction": from_instruction, "mc": from_mc}


def detect_format(record: dict, origin: str) -> str:
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields):
            return fmt
    raise DataError(f"{origin} record 0: fields {sorted(record)} match no known format "
                    f"(instruction: {', '.join(FORMAT_FIELDS['instruction'])}; mc: question, choices, answerKey)")


def to_examples(records: list[dict], fmt: str = "auto", origin: str = "<records>") -> list[Example]:
    """Validate every record (missing fields name file, index and field), then convert."""
    if not records:
        raise DataError(f"{origin}: the dataset is empty")
    if fmt == "auto":
        fmt = detect_format(records[0], origin)
    if fmt not in PARSERS:
        raise DataError(f"data_format ({fmt!r}) must be one of auto, {', '.join(PARSERS)}")
    required = FORMAT_FIELDS[fmt]
    for i, rec in enumerate(records):
        for field in required:
            if rec.get(field) is None:
                raise DataError(f"{origin} record {i}: missing field {field!r} "
                                f"({fmt} format needs {', '.join(required)})")
    return [PARSERS[fmt](rec, f"{origin} record {i}") for i, rec in enumerate(records)]


def load_examples(source: str, split: str, fmt: str = "auto", *, limit: int | None = None,
                  seed: int = 0) -> list[Example]:
    """Load, validate and convert a split; ``limit`` takes a seeded random subsample."""
    records, origin = load_records(source, split)
    examples = to_examples(records, fmt, origin)
    if limit and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
    return examples
