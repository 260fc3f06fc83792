"""Exact match of a generated answer against the reference reply, after normalisation: case, punctuation
and runs of white space do not count ("Apple." matches "apple"); anything else does ("an apple", "The
answer is apple." do not). What short-answer data (the default job's one-word replies, a classification
label, an extracted span) is scored by when it is answered by generation."""

from __future__ import annotations

import string
import unicodedata

_PUNCTUATION = str.maketrans("", "", string.punctuation + "“”‘’«»")
SHORT_ANSWER_TOKENS = 8  # answer_accuracy auto: every held-out reply at most this many tokens


def normalise_answer(text: str) -> str:
    """Lower case, NFKC, punctuation removed, white space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION).split())


def exact_match(reply: str, reference: str) -> bool:
    return normalise_answer(reply) == normalise_answer(reference)
