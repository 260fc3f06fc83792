"""The default job's data (builtin:word_categories_chat) and how its answers are scored (exact match)."""

import collections
import json
import re

import pytest

from adamole_dist.data import load_records, synthetic, word_chat
from adamole_dist.data.answer_match import exact_match, normalise_answer
from adamole_dist.data.run_data import answers_scored

ASKED = re.compile(r"Which of these words is (.+)\? (.+)\.")


def parsed(record: dict) -> tuple[str, list[str], str]:
    system, user, reply = record["messages"]
    assert (system["role"], user["role"], reply["role"]) == ("system", "user", "assistant")
    assert system["content"] == word_chat.SYSTEM
    phrase, words = ASKED.fullmatch(user["content"]).groups()
    return phrase, words.split(", "), reply["content"]


def test_questions_are_deterministic_and_splits_differ():
    gen = word_chat.generate_word_categories_chat
    assert gen("train", 40, seed=3) == gen("train", 40, seed=3)
    assert gen("train", 40, seed=3) != gen("train", 40, seed=4)
    assert gen("validation", 40) != gen("test", 40)
    with pytest.raises(ValueError, match="split"):
        gen("dev")


def test_held_out_questions_use_only_held_out_words():
    train = {w for rec in word_chat.generate_word_categories_chat("train") for w in parsed(rec)[1]}
    for split in ("validation", "test"):
        held = {w for rec in word_chat.generate_word_categories_chat(split) for w in parsed(rec)[1]}
        assert held and not train & held, split
    everything_held = {w for ws in synthetic.word_split().values() for w in ws["heldout"]}
    assert held <= everything_held


def test_exactly_one_word_is_of_the_asked_category_and_it_is_the_answer():
    categories, _ = synthetic.word_lists()
    category_of = {w: c for c, spec in categories.items() for w in spec["words"]}
    records = word_chat.generate_word_categories_chat("train", 800)
    positions = collections.Counter()
    for rec in records:
        phrase, words, answer = parsed(rec)
        asked = next(c for c, spec in categories.items() if phrase in spec["phrases"])
        assert [w for w in words if category_of[w] == asked] == [answer]
        positions[words.index(answer)] += 1
    assert sorted(positions) == [0, 1, 2, 3] and min(positions.values()) > 150, positions


def test_builtin_source_sizes_and_cli(tmp_path):
    records, origin = load_records("builtin:word_categories_chat", "test")
    assert len(records) == 60 and origin == "builtin:word_categories_chat[test]"
    word_chat.main(["--out", str(tmp_path)])
    assert json.loads((tmp_path / "test.json").read_text()) == records


@pytest.mark.parametrize("reply, reference, same", [
    ("apple", "apple", True), ("Apple.", "apple", True), ("  APPLE!\n", "apple", True),
    ("\u201capple\u201d", "apple", True), ("ice  cream", "ice cream", True),
    ("an apple", "apple", False), ("The answer is apple.", "apple", False), ("", "apple", False),
])
def test_exact_match_ignores_case_punctuation_and_spacing_only(reply, reference, same):
    assert exact_match(reply, reference) is same
    assert normalise_answer(reply) == normalise_answer(reply.upper())


class Words:  # a tokenizer stand-in: one token per word
    @staticmethod
    def encode(text, add_special_tokens=False):
        return text.split()


def test_answer_accuracy_auto_is_on_for_short_replies_only():
    assert answers_scored("auto", ["apple", "a sports car"], Words())
    assert not answers_scored("auto", ["apple", "one two three four five six seven eight nine"], Words())
    assert not answers_scored("auto", [], Words())
    assert answers_scored("on", ["a long " * 20], Words()) and not answers_scored("off", ["apple"], Words())


def test_the_token_cache_keys_a_builtin_split_by_its_generated_content(monkeypatch):
    """A package version that generates the split differently must not reuse the tokens of the old one."""
    from adamole_dist.data import token_cache

    monkeypatch.setattr(token_cache, "_FINGERPRINTS", {})
    train = token_cache.data_fingerprint("builtin:word_categories_chat[train]")
    assert train.startswith("sha256:") and train != token_cache.data_fingerprint("builtin:word_categories_chat[test]")
    monkeypatch.setattr(token_cache, "_FINGERPRINTS", {})
    monkeypatch.setattr(word_chat, "SYSTEM", "Reply in one word.")
    assert token_cache.data_fingerprint("builtin:word_categories_chat[train]") != train
