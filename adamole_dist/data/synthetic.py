"""The built-in generated task ``builtin:word_categories``: which of four words belongs to a category.

The project's default training data, made on the spot (no downloads). Records use the
instruction format of ../shared/data, so they flow through the same loader. Each category's
words are split once, by a fixed seed independent of the generation seed, into training words
and held-out words: validation and test questions use only held-out words (as the answer and
as distractors), so accuracy measures what the model generalises from its pretrained word
knowledge, not what it memorised. Distractors come from three other categories; the correct
position is uniform.

    python -m adamole_dist.data.synthetic --out DIR     # writes DIR/{train,validation,test}.json
"""

from __future__ import annotations

import argparse
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

WORDS_FILE = Path(__file__).with_name("word_categories.json")
WORD_SPLIT_SEED = 1234  # fixed: every generation seed sees the same train/held-out words
HELD_OUT_FRACTION = 0.25
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
DEFAULT_SIZES = {"train": 2000, "validation": 400, "test": 400}
NUM_CHOICES = 4
LEAD_IN = "Please choose the correct answer to the question: "


@lru_cache(maxsize=1)
def word_lists() -> tuple[dict[str, dict], list[str]]:
    """({category: {"phrases": [...], "words": [...]}}, question templates) from the package data file."""
    try:
        doc = json.loads(WORDS_FILE.read_text(encoding="utf-8"))
        return doc["categories"], doc["templates"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"{WORDS_FILE}: the packaged word lists are unreadable ({e}); "
                           "reinstall adamole_dist") from e


@lru_cache(maxsize=1)
def word_split() -> dict[str, dict[str, list[str]]]:
    """Per category: {"train": words, "heldout": words}, disjoint and fixed."""
    categories, _ = word_lists()
    rng = random.Random(WORD_SPLIT_SEED)
    out = {}
    for cat, spec in categories.items():
        words = sorted(spec["words"])
        rng.shuffle(words)
        n_held = max(1, round(HELD_OUT_FRACTION * len(words)))
        out[cat] = {"heldout": sorted(words[:n_held]), "train": sorted(words[n_held:])}
    return out


def make_record(question: str, words: list[str], answer_pos: int) -> dict:
    """One instruction-format record (the layout of ../shared/data's multiple-choice tasks)."""
    options = " ".join(f"Answer{i + 1}: {w}" for i, w in enumerate(words))
    labels = "/".join(f"answer{i + 1}" for i in range(len(words)))
    return {
        "instruction": f"{LEAD_IN}{question}\n\n{options}\n\nAnswer format: {labels}",
        "input": "",
        "output": f"the correct answer is answer{answer_pos + 1}",
        "answer": f"answer{answer_pos + 1}",
    }


class SplitDraw(NamedTuple):
    """What a split's questions are drawn from: how many, the words a category may use there (its
    training or held-out words), the categories in order, and the split's seeded generator."""

    n: int
    words_of: dict[str, list[str]]
    cats: list[str]
    rng: random.Random


def split_draw(split: str, num_examples: int | None, seed: int, sizes: dict[str, int],
               seed_offset: int = 0) -> SplitDraw:
    """The checked split and size (``sizes``: the default per split) and its draw; ValueError names a bad one."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split ({split!r}) must be one of {', '.join(SPLIT_SEEDS)}")
    n = sizes[split] if num_examples is None else num_examples
    if n < 0:
        raise ValueError(f"num_examples ({n}) must be >= 0")
    pool = "train" if split == "train" else "heldout"
    words_of = {cat: ws[pool] for cat, ws in word_split().items()}
    return SplitDraw(n, words_of, sorted(word_lists()[0]),
                     random.Random(seed * 1000 + SPLIT_SEEDS[split] + seed_offset))


def generate_word_categories(split: str, num_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Deterministic records of one split (train / validation / test); size defaults per split."""
    n, words_of, cats, rng = split_draw(split, num_examples, seed, DEFAULT_SIZES)
    categories, templates = word_lists()
    records = []
    for _ in range(n):
        cat = rng.choice(cats)
        question = rng.choice(templates).format(phrase=rng.choice(categories[cat]["phrases"]))
        others = rng.sample([c for c in cats if c != cat], NUM_CHOICES - 1)
        words = [rng.choice(words_of[c]) for c in others]
        answer_pos = rng.randrange(NUM_CHOICES)
        words.insert(answer_pos, rng.choice(words_of[cat]))
        records.append(make_record(question, words, answer_pos))
    return records



def write_splits(generate, description: str, argv: list[str] | None) -> None:
    """A generated task's command line: ``--out DIR`` gets {train,validation,test}.json of ``generate``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True, help="directory for train.json, validation.json, test.json")
    ap.add_argument("--seed", type=int, default=0, help="question stream seed (the word split never changes)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SEEDS:
        path = args.out / f"{split}.json"
        path.write_text(json.dumps(generate(split, seed=args.seed), indent=1))
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    write_splits(generate_word_categories, "Write the generated word-categories task as JSON files.", argv)


if __name__ == "__main__":
    main()
