"""Generate text with a trained adapter (or a base model alone): one prompt, a file of prompts, or a chat.

    python launch/generate.py --adapter runs/default/adapter --prompt "Name three colours."
    python launch/generate.py --adapter DIR --prompts prompts.jsonl --out completions.jsonl --batch_size 8
    python launch/generate.py --adapter DIR --chat     # interactive; or --model smollm2-135m: the base alone

Prompts are rendered exactly as training rendered them (the adapter's "prompt_format": chat template,
Alpaca template or plain text). A prompt file holds one JSON object per line, {"prompt": "..."} (with
"input" for Alpaca's second field) or {"messages": [{"role": ..., "content": ...}, ...]}; the output is
one JSON object per prompt (the input fields, "completion", "new_tokens", "stopped_at": the stop token, null
at the limit), written to --out whole at the end (a temporary renamed into place: a failure or Ctrl-C leaves
--out as it was). Greedy by default; --temperature > 0 samples (with --top_p): each prompt draws from its own
generator, seeded from --seed and its index in the file: the same sample at any --batch_size. Batches are
left-padded (never routed); on a terminal the tokens of a single prompt stream as they come.
--show_routing: per generated token, the experts fired in each adapted layer (mean, and a strip of one
character per layer; "routing" in JSONL). --chat: Ctrl-C stops a reply and keeps the chat.

Bad input: one line, exit 2, before the model loads where it can be known then (a prompt file that is not
JSONL or UTF-8, a record training would refuse, --out a directory, unwritable, the prompt file or inside a
training run, an encoder adapter, ...); Ctrl-C or SIGTERM: one line, exit 130. One process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from adamole_dist.atomic_files import open_atomically
from adamole_dist.cli.console import configure_logging, interruptible
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS, MAX_SEED
from adamole_dist.data.examples import DataError
from adamole_dist.generation.batched import completions, sampling_options
from adamole_dist.generation.chat import chat_session
from adamole_dist.generation.loading import DTYPES, check_generates, resolve_device
from adamole_dist.generation.prompts import FORMATS, PromptRenderer, check_record, prompt_format_for, read_prompts
from adamole_dist.generation.routing_view import routing_lines
from adamole_dist.run_files.writable import check_output_file


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, help="adapter folder: ours or a PEFT LoRA's (none: the base model)")
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
    ap.add_argument("--seed", type=int, default=0, help="sampling: each prompt draws from (seed, its index)")
    ap.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (left padding)")
    ap.add_argument("--show_routing", action="store_true", help="experts fired per generated token and layer")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                    help="attention kernel (default: as the adapter was trained, else auto)")
    return ap


def check_args(args) -> None:
    if args.adapter is None and not args.model:
        raise ConfigError("--adapter or --model is required")
    limits = {"max_new_tokens": (args.max_new_tokens >= 1, ">= 1"), "batch_size": (args.batch_size >= 1, ">= 1"),
              "temperature": (args.temperature >= 0, ">= 0"), "top_p": (0 < args.top_p <= 1, "in (0, 1]"),
              "seed": (0 <= args.seed <= MAX_SEED, f"in [0, {MAX_SEED}]")}
    for name, (ok, why) in limits.items():
        if not ok:
            raise ConfigError(f"--{name} ({getattr(args, name)}) must be {why}")
    args.device = resolve_device(args.device)
    if args.chat and args.out:
        raise ConfigError("--out applies to --prompt and --prompts, not --chat")
    if args.out is not None:  # the prompt file and the adapter are read; --out must not be either
        check_output_file(args.out, "--out", [(o, p) for o, p in (("--prompts", args.prompts),
                                                                   ("--adapter", args.adapter)) if p is not None])


def prepare(args):
    """Everything checked, the model loaded: (model, tokenizer, adapters, renderer, prompt records, their ids).
    ConfigError / DataError on bad input (the cheap checks before the model loads)."""
    check_args(args)
    meta = None
    if args.adapter is not None:
        from adamole_dist.adapters.files import read_adapter_config

        meta = read_adapter_config(args.adapter)
    check_generates(meta, args.adapter, args.model)
    records, places = [], []  # --chat: none
    if args.prompts or args.prompt is not None:
        records, places = read_prompts(args.prompts) if args.prompts else ([check_record(
            {"prompt": args.prompt}, "--prompt")], ["--prompt"])
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
    with open_atomically(args.out) if args.out else contextlib.nullcontext(sys.stdout) as sink:
        results = completions(model, tokenizer, rows, options, batch_size=args.batch_size, adapters=adapters,
                              show_routing=args.show_routing, seed=args.seed,
                              streamer=(lambda: TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
                              if stream else None)
        for rec, res in zip(records, results):
            if jsonl:
                out = {**rec, "completion": res["text"], "new_tokens": len(res["ids"]), "stopped_at": res["stop"]}
                if args.show_routing:
                    out["routing"] = res["routing"]
                sink.write(json.dumps(out) + "\n")
                sink.flush()
                continue
            if not stream:
                print(res["text"])
            if args.show_routing:
                print("\n".join(routing_lines(res["routing"])))


@interruptible
def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer, adapters, renderer, records, rows = prepare(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import set_seed

    set_seed(args.seed)
    options = sampling_options(args.max_new_tokens, args.temperature, args.top_p)
    if args.chat:
        chat_session(model, tokenizer, renderer, options, adapters, args.show_routing, args.seed)
    else:
        write_completions(args, model, tokenizer, adapters, records, rows, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
