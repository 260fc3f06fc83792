"""Generate text with a trained adapter (or a base model alone): one prompt, a file of prompts, or a chat.

    python launch/generate.py --adapter runs/default/adapter --prompt "Name three colours."
    python launch/generate.py --adapter DIR --prompts prompts.jsonl --out completions.jsonl --batch_size 8
    python launch/generate.py --adapter DIR --chat                 # interactive, history kept
    python launch/generate.py --model smollm2-135m --prompt "..."  # the base model, no adapter

Prompts are rendered exactly as training rendered them (the adapter's "prompt_format": chat template,
Alpaca template or plain text). A prompt file holds one JSON object per line, {"prompt": "..."} (with
"input" for Alpaca's second field) or {"messages": [{"role": ..., "content": ...}, ...]}; the output is
one JSON object per prompt (the input fields plus "completion"). Greedy by default; --temperature > 0
samples (with --top_p, --seed). Batches are left-padded; padding is never routed. On a terminal the
tokens of a single prompt stream as they come. --show_routing: per generated token, the experts fired
in each adapted layer (mean, and a strip of one character per layer; "routing" in JSONL).

Exit 2 with one line on bad input (missing adapter directory, a prompt file that is not JSONL, --chat
with a tokenizer that has no chat template, ...). Runs in one process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adamole_dist.cli.console import configure_logging
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS
from adamole_dist.data.examples import DataError
from adamole_dist.generation.batched import generate_batch, sampling_options
from adamole_dist.generation.chat import chat_session
from adamole_dist.generation.loading import DTYPES
from adamole_dist.generation.prompts import FORMATS, PromptRenderer, prompt_format_for, read_prompts
from adamole_dist.generation.routing_view import routing_lines


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, help="adapter directory written by training (none: the base model)")
    ap.add_argument("--model", help="base model (default: the one recorded in the adapter config)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", type=Path, help='JSONL file: {"prompt": ...} or {"messages": [...]} per line')
    source.add_argument("--chat", action="store_true", help="interactive chat (history kept; /reset, /exit)")
    ap.add_argument("--out", type=Path, help="write JSONL here (default: stdout)")
    ap.add_argument("--format", choices=FORMATS, default="auto",
                    help="prompt rendering (default: as the adapter was trained; chat for a base chat model)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (left padding)")
    ap.add_argument("--show_routing", action="store_true", help="experts fired per generated token and layer")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                    help="attention kernel (default: as the adapter was trained, else auto)")
    return ap.parse_args(argv)


def check_args(args) -> None:
    if args.adapter is None and not args.model:
        raise ConfigError("--adapter or --model is required")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} ({getattr(args, name)}) must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature ({args.temperature}) must be >= 0 and --top_p ({args.top_p}) in (0, 1]")
    if args.chat and args.out:
        raise ConfigError("--out applies to --prompt and --prompts, not --chat")


def prepare(args):
    """Everything checked, the model loaded: (model, tokenizer, adapters, renderer, prompt records, their ids).
    ConfigError / DataError on bad input (the cheap checks before the model loads)."""
    check_args(args)
    meta = None
    if args.adapter is not None:
        from adamole_dist.adapters.files import read_adapter_config

        meta = read_adapter_config(args.adapter)
    records, places = read_prompts(args.prompts) if args.prompts else ([{"prompt": args.prompt}], ["--prompt"])
    if args.chat:
        records, places = [], []
    from adamole_dist.generation.loading import load_for_generation

    model, tokenizer, adapters = load_for_generation(args.adapter, args.model, args.device, args.dtype,
                                                     args.attn_implementation)
    if args.show_routing and (adapters is None or not adapters.cfg.is_moe):
        raise ConfigError("--show_routing needs an adapter with experts (" + (
            f"method {adapters.cfg.method!r} routes nothing)" if adapters else "no --adapter given)"))
    if args.chat and not tokenizer.chat_template:
        raise ConfigError(f"--chat: the tokenizer of {args.model or meta.get('base_model')} has no chat template "
                          "(not a chat model); use --prompt or --prompts")
    renderer = PromptRenderer(tokenizer, "chat" if args.chat else prompt_format_for(args.format, meta, tokenizer))
    rows = [renderer.ids(rec, place) for rec, place in zip(records, places)]
    return model, tokenizer, adapters, renderer, records, rows


def write_completions(args, model, tokenizer, adapters, records, rows, options) -> None:
    """JSONL (input fields + "completion") for --prompts or --out, else the text, streamed on a terminal."""
    from transformers import TextStreamer

    jsonl = args.prompts is not None or args.out is not None
    stream = not jsonl and sys.stdout.isatty()
    sink = args.out.open("w") if args.out else sys.stdout
    try:
        for start in range(0, len(rows), args.batch_size):
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
            results = generate_batch(model, tokenizer, rows[start : start + args.batch_size], options,
                                     adapters=adapters, show_routing=args.show_routing, streamer=streamer)
            for rec, res in zip(records[start:], results):
                if jsonl:
                    out = {**rec, "completion": res["text"], "new_tokens": len(res["ids"])}
                    if args.show_routing:
                        out["routing"] = res["routing"]
                    sink.write(json.dumps(out) + "\n")
                    sink.flush()
                    continue
                if not stream:
                    print(res["text"])
                if args.show_routing:
                    print("\n".join(routing_lines(res["routing"])))
    finally:
        if args.out:
            sink.close()


def main(argv=None) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        model, tokenizer, adapters, renderer, records, rows = prepare(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import set_seed

    set_seed(args.seed)
    options = sampling_options(args.max_new_tokens, args.temperature, args.top_p)
    if args.chat:
        chat_session(model, tokenizer, renderer, options, adapters, args.show_routing)
    else:
        write_completions(args, model, tokenizer, adapters, records, rows, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
