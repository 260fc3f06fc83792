"""What every data module agrees on, torch-free: the multiple-choice ``Example``, the label of tokens
that are no target (``IGNORE``), and ``DataError``.

A tokenized free-form example is ``{"input_ids": [...], "labels": [...]}``: labels aligned with the
ids, ``IGNORE`` where a token is not a target, the first label always ``IGNORE`` (nothing inside the
example predicts its first token); the loss is the shifted one (logits[:, :-1] predict labels[:, 1:]).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of positions that do not count in the loss (cross_entropy's ignore_index)


class DataError(ValueError):
    """A dataset is missing, malformed or lacks a field; the message names the file and the field."""


@dataclass
class Example:
    """A multiple-choice example, as both task framings read it (see data/formats.py's joining rule)."""

    context: str  # the bare question, which an encoder scores each choice text against
    choice_texts: list[str]  # the choices' texts, for encoder pair scoring
    prompt: str  # causal-LM text up to the answer (no trailing space)
    candidates: list[str]  # causal-LM continuations, one per choice (see the joining rule above)
    label: int  # index of the correct choice
    target: str  # causal-LM training target appended to prompt: the correct candidate
