"""Generate text with a trained adapter (or a base model alone): one prompt, a file of prompts, or a chat.

    python launch/generate.py --adapter runs/default/adapter --prompt "Name three colours."
    python launch/generate.py --adapter DIR --prompts prompts.jsonl --out completions.jsonl --batch_size 8
    python launch/generate.py --adapter DIR --chat                 # interactive, history kept
    python launch/generate.py --model smollm2-135m --prompt "..."  # the base model, no adapter

Prompts are rendered exactly as training rendered them (the adapter's "prompt_format"): chat models
through the tokenizer's chat template (the adapter's own template where training supplied one) with
the generation prompt added, Alpaca-trained adapters through the Alpaca template, anything else as
plain text. A prompt file holds one JSON object per line, {"prompt": "..."} (with "input" for Alpaca's
second field) or {"messages": [{"role": ..., "content": ...}, ...]}; the output is one JSON object
per prompt (the input fields plus "completion"). Greedy by default; --temperature > 0 samples (with
--top_p, --seed). Batches are left-padded; padding is never routed. On a terminal the tokens of a
single prompt stream as they come.

--show_routing: per generated token, how many experts fired in each adapted layer to produce it (the
forward whose last position predicted the token): the mean over layers and a strip of one character
per layer in model order (0-9, then a-z for 10-35). In JSONL output it is the "routing" field.

Exit 2 with one line on bad input (missing adapter directory, a prompt file that is not JSONL, --chat
with a tokenizer that has no chat template, ...). Runs in one process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adamole_dist.cli.console import configure_logging
from adamole_dist.config.fields import ConfigError
from adamole_dist.data import DataError
from adamole_dist.data.formats import ALPACA, ALPACA_WITH_INPUT
from adamole_dist.data.sft_render import chat_prompt_ids, special_prefix  # training's rendering

FORMATS = ("auto", "chat", "alpaca", "text")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRIP_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


# -- prompts -----------------------------------------------------------------------------------------
def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """(records of a JSONL prompt file, where each one is: "FILE line N"); DataError naming the file
    and line otherwise."""
    if not path.is_file():
        raise DataError(f"prompt file {path} not found")
    records, places = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not JSON ({e.msg}); a prompt file holds one JSON object "
                            "per line") from None
        check_record(rec, f"{path} line {n}")
        records.append(rec)
        places.append(f"{path} line {n}")
    if not records:
        raise DataError(f"prompt file {path} holds no prompts")
    return records, places


def check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with \"prompt\" or \"messages\", got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in msgs)):
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    elif not isinstance(rec.get("prompt"), str):
        raise DataError(f"{where}: needs a \"prompt\" string or a \"messages\" list")


class PromptRenderer:
    """A prompt record -> the token ids generation starts from, rendered by training's own functions
    (data/sft_render.py): chat through the template with the generation prompt, else the special
    prefix (BOS) + the text, Alpaca-templated for alpaca (an "input" field gives ALPACA_WITH_INPUT)."""

    def __init__(self, tokenizer, fmt: str) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.prefix = special_prefix(tokenizer)

    def ids(self, rec: dict, where: str = "prompt") -> list[int]:
        tok = self.tokenizer
        if "messages" in rec or self.fmt == "chat":
            if not tok.chat_template:
                raise DataError(f"{where}: chat messages need a chat template and this tokenizer has none")
            messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
            try:
                return chat_prompt_ids(tok, tok.chat_template, messages)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
        text = rec["prompt"]
        if self.fmt == "alpaca":
            inp = rec.get("input") or ""
            text = (ALPACA_WITH_INPUT.format(instruction=text, input=inp) if inp.strip()
                    else ALPACA.format(instruction=text))
        return self.prefix + tok(text, add_special_tokens=False)["input_ids"]


def resolve_format(requested: str, meta: dict | None, tokenizer) -> str:
    """--format auto: the adapter's prompt_format (chat, alpaca; anything else is plain text); without
    an adapter, chat where the tokenizer has a template."""
    if requested != "auto":
        return requested
    if meta is not None:
        fmt = meta.get("prompt_format")
        return fmt if fmt in ("chat", "alpaca") else "text"
    return "chat" if tokenizer.chat_template else "text"


# -- generation --------------------------------------------------------------------------------------
def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def generate_batch(model, tokenizer, rows: list[list[int]], options: dict, *, adapters=None,
                   show_routing: bool = False, streamer=None) -> list[dict]:
    """Generate for a batch of prompt ids (left-padded); per row {"ids", "text"} and, with
    show_routing, "routing": per generated token {"token", "mean_active", "per_layer"}."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(rows, pad, device)
    stop = eos_ids(model, tokenizer)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad, streamer=streamer,
                  **options)
    with torch.no_grad():
        if show_routing:
            with adapters.context.recording_active_experts() as log:
                sequences = model.generate(**kwargs)
        else:
            sequences = model.generate(**kwargs)
    new_ids = sequences[:, input_ids.shape[1]:].cpu()
    if show_routing:
        # Forward j predicted generated token j from its last position (prefill: the prompt's last);
        # counts[row, generated token, layer] = experts fired there, layers in model order.
        names = list(adapters.layers)
        counts = torch.stack([torch.stack([step[n][:, -1] for n in names], dim=-1) for step in log], dim=1).cpu()
    out = []
    for b, row in enumerate(new_ids.tolist()):
        keep = next((j for j, t in enumerate(row) if t in stop), len(row))
        item = {"ids": row[:keep], "text": tokenizer.decode(row[:keep], skip_special_tokens=True)}
        if show_routing:
            item["routing"] = [{"token": tokenizer.decode([t]), "mean_active": float(c.float().mean()),
                                "per_layer": c.tolist()} for t, c in zip(row[:keep], counts[b, :keep])]
        out.append(item)
    return out


def generation_options(args) -> dict:
    if args.temperature > 0:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
                "top_p": args.top_p}
    return {"max_new_tokens": args.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
            "top_k": None}


def routing_lines(routing: list[dict]) -> list[str]:
    return [f"{item['token']!r:>14}  mean {item['mean_active']:5.2f}  "
            f"{''.join(STRIP_CHARS[min(c, len(STRIP_CHARS) - 1)] for c in item['per_layer'])}"
            for item in routing]


# -- entry -------------------------------------------------------------------------------------------
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


def load(args):
    """(model, tokenizer, the Adapters handle or None)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if args.adapter is not None:
        from adamole_dist.adapters.pretrained import from_pretrained

        model, tokenizer = from_pretrained(args.adapter, model=args.model, device=device, dtype=dtype)
        return model, tokenizer, model.adamole_adapters
    from adamole_dist.base_model.model_loading import load_model_and_tokenizer

    model, tokenizer, _, _ = load_model_and_tokenizer(args.model, "causal_lm", dtype=dtype)
    return model.eval().to(device), tokenizer, None


def chat_loop(model, tokenizer, renderer, options, adapters, show_routing) -> None:
    from transformers import TextStreamer

    history: list[dict] = []
    print("chat: an empty line does nothing; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        [reply] = generate_batch(model, tokenizer, [renderer.ids({"messages": history})], options,
                                 adapters=adapters, show_routing=show_routing, streamer=streamer)
        history.append({"role": "assistant", "content": reply["text"]})
        if show_routing:
            print("\n".join(routing_lines(reply["routing"])))


def main(argv=None) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        check_args(args)
        meta = None
        if args.adapter is not None:  # cheap checks before the model loads
            from adamole_dist.adapters.files import read_adapter_config

            meta = read_adapter_config(args.adapter)
        records, places = read_prompts(args.prompts) if args.prompts else ([{"prompt": args.prompt}], ["--prompt"])
        if args.chat:
            records, places = [], []
        model, tokenizer, adapters = load(args)
        if args.show_routing and (adapters is None or not adapters.cfg.is_moe):
            raise ConfigError("--show_routing needs an adapter with experts (" + (
                f"method {adapters.cfg.method!r} routes nothing)" if adapters else "no --adapter given)"))
        if args.chat and not tokenizer.chat_template:
            raise ConfigError(f"--chat: the tokenizer of {args.model or meta.get('base_model')} has no chat template "
                              "(not a chat model); use --prompt or --prompts")
        renderer = PromptRenderer(tokenizer, "chat" if args.chat else resolve_format(args.format, meta, tokenizer))
        rows = [renderer.ids(rec, place) for rec, place in zip(records, places)]
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import TextStreamer, set_seed

    set_seed(args.seed)
    options = generation_options(args)
    if args.chat:
        chat_loop(model, tokenizer, renderer, options, adapters, args.show_routing)
        return 0
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
                else:
                    if not stream:
                        print(res["text"])
                    if args.show_routing:
                        print("\n".join(routing_lines(res["routing"])))
    finally:
        if args.out:
            sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
