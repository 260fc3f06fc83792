"""The built-in generated task ``builtin:word_categories``: which of four words belongs to a category.

Records use the instruction format of ../shared/data, so they flow through the same loader.
Each category's words are split once (fixed seed) into training words and held-out words:
validation and test questions use only held-out words, so accuracy measures what the
pretrained model generalises, not what it memorised. The correct position is uniform.

    python -m adamole_dist.data.synthetic --out DIR     # writes DIR/train.json, DIR/test.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    # category: (question phrasings, words)
    "fruit": (["a kind of fruit", "a fruit you can eat"],
              ["apple", "banana", "orange", "grape", "pear", "peach", "cherry", "mango", "lemon", "plum",
               "strawberry", "pineapple", "watermelon", "apricot", "kiwi", "papaya", "coconut", "lime",
               "raspberry", "blueberry"]),
    "animal": (["an animal", "a kind of animal"],
               ["dog", "cat", "horse", "lion", "tiger", "elephant", "rabbit", "wolf", "bear", "monkey",
                "giraffe", "zebra", "fox", "deer", "cow", "sheep", "goat", "camel", "kangaroo", "squirrel"]),
    "color": (["a color", "the name of a colour"],
              ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray",
               "violet", "turquoise", "crimson", "beige", "maroon", "navy", "scarlet", "indigo", "magenta",
               "olive"]),
    "tool": (["a tool", "a hand tool"],
             ["hammer", "screwdriver", "wrench", "saw", "drill", "pliers", "chisel", "shovel", "rake", "axe",
              "spanner", "crowbar", "file", "trowel", "mallet", "level", "sander", "clamp", "hacksaw", "hoe"]),
    "vehicle": (["a vehicle", "something you can drive or ride"],
                ["car", "truck", "bus", "bicycle", "motorcycle", "train", "tractor", "van", "scooter", "taxi",
                 "ambulance", "tram", "jeep", "limousine", "minivan", "trolley", "bulldozer", "moped",
                 "lorry", "wagon"]),
    "country": (["a country", "the name of a nation"],
                ["france", "germany", "japan", "brazil", "canada", "mexico", "india", "china", "italy", "spain",
                 "egypt", "kenya", "norway", "sweden", "peru", "chile", "argentina", "vietnam", "turkey",
                 "greece"]),
    "instrument": (["a musical instrument", "an instrument you can play"],
                   ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "clarinet",
                    "saxophone", "trombone", "banjo", "oboe", "accordion", "harmonica", "ukulele", "tuba",
                    "bassoon", "xylophone", "mandolin"]),
    "body part": (["a part of the human body", "a body part"],
                  ["arm", "leg", "hand", "foot", "head", "nose", "ear", "eye", "mouth", "knee", "elbow",
                   "shoulder", "finger", "toe", "ankle", "wrist", "neck", "chin", "heel", "thumb"]),
    "profession": (["a profession", "a kind of job"],
                   ["doctor", "teacher", "lawyer", "nurse", "engineer", "farmer", "pilot", "chef", "dentist",
                    "plumber", "carpenter", "electrician", "firefighter", "architect", "pharmacist",
                    "journalist", "accountant", "mechanic", "librarian", "surgeon"]),
    "furniture": (["a piece of furniture", "furniture found in a home"],
                  ["chair", "table", "sofa", "bed", "desk", "wardrobe", "bookshelf", "stool", "dresser",
                   "cabinet", "couch", "bench", "armchair", "cupboard", "nightstand", "ottoman", "recliner",
                   "sideboard", "futon", "crib"]),
    "weather": (["a kind of weather", "a weather condition"],
                ["rain", "snow", "hail", "fog", "thunder", "lightning", "drizzle", "sleet", "storm", "wind",
                 "blizzard", "hurricane", "tornado", "sunshine", "frost", "mist", "breeze", "monsoon",
                 "drought", "heatwave"]),
    "sport": (["a sport", "a game people play as a sport"],
              ["soccer", "tennis", "basketball", "baseball", "golf", "hockey", "rugby", "cricket", "volleyball",
               "boxing", "swimming", "cycling", "skiing", "wrestling", "badminton", "archery", "fencing",
               "rowing", "surfing", "karate"]),
}
HELD_OUT_FRACTION = 0.25
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
DEFAULT_SIZES = {"train": 2000, "validation": 400, "test": 400}
NUM_CHOICES = 4


def word_split(seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Per category: {'train': words, 'heldout': words}, disjoint, fixed by ``seed``."""
    rng = random.Random(seed)
    out = {}
    for cat, (_, words) in CATEGORIES.items():
        shuffled = words[:]
        rng.shuffle(shuffled)
        n_held = max(1, round(HELD_OUT_FRACTION * len(words)))
        out[cat] = {"heldout": sorted(shuffled[:n_held]), "train": sorted(shuffled[n_held:])}
    return out


def generate_word_categories(split: str, num_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Deterministic records of one split in the instruction format."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split ({split!r}) must be one of {', '.join(SPLIT_SEEDS)}")
    n = DEFAULT_SIZES[split] if num_examples is None else num_examples
    pools = {cat: ws["train" if split == "train" else "heldout"] for cat, ws in word_split(seed).items()}
    rng = random.Random(seed * 1000 + SPLIT_SEEDS[split])
    cats = list(CATEGORIES)
    records = []
    for _ in range(n):
        cat = rng.choice(cats)
        phrase = rng.choice(CATEGORIES[cat][0])
        others = rng.sample([c for c in cats if c != cat], NUM_CHOICES - 1)
        words = [rng.choice(pools[c]) for c in others]
        answer_pos = rng.randrange(NUM_CHOICES)
        words.insert(answer_pos, rng.choice(pools[cat]))
        options = " ".join(f"Answer{i + 1}: {w}" for i, w in enumerate(words))
        labels = "/".join(f"answer{i + 1}" for i in range(NUM_CHOICES))
        records.append({
            "instruction": f"Please choose the correct answer to the question: Which of these is {phrase}?"
                           f"\n\n{options}\n\nAnswer format: {labels}",
            "input": "",
            "output": f"the correct answer is answer{answer_pos + 1}",
            "answer": f"answer{answer_pos + 1}",
        })
    return records


BUILTIN = {"word_categories": generate_word_categories}


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the generated word-categories task as JSON files.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        path = args.out / f"{split}.json"
        path.write_text(json.dumps(generate_word_categories(split, seed=args.seed), indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
