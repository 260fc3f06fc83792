"""Serve a base model and the adapters trained on it behind OpenAI's API (pip install -e '.[serve]').

    python launch/serve.py --adapter adamole=runs/default/adapter               # or: adamole-serve
    python launch/serve.py --model smollm2-135m --adapter a=DIR_A --adapter b=DIR_B --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "adamole", "messages": [{"role": "user", "content": "Name three colours."}]}'

POST /v1/chat/completions and /v1/completions (streamed with "stream": true), GET /v1/models, GET /health.
A request's "model" picks an adapter by its NAME, or the base alone (--base_name, default "base"). Every
adapter must record the same base (--model, default the one the first adapter records); one trained on
another is refused at start. Chat prompts render exactly as training rendered them; concurrent requests
share one forward per step (continuous batching, up to --max_batch_size sequences per model; beyond that at
most --max_queue wait, more get 429). Greedy unless "temperature" > 0. Extension fields: "adamole_routing":
true (experts fired per generated token and layer), "ignore_eos": true. SIGTERM drains (in-flight requests
finish, at most --drain_timeout seconds) and exits 0. --api_key (or $ADAMOLE_SERVE_API_KEY): every request
needs "Authorization: Bearer KEY". docs/serving.md: the clients (curl, openai, lm-evaluation-harness, chat UIs).

Exit 2 with one line on bad input (an adapter directory that is not one, adapters of another base, a port
in use, ...), before any request is served.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adamole_dist.cli.console import configure_logging
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import HOST_MEMORY
from adamole_dist.data.examples import DataError
from adamole_dist.generation.loading import DTYPES
from adamole_dist.runtime.stopping import EXIT_BAD_INPUT

API_KEY_ENV = "ADAMOLE_SERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="serve the adapter in DIR as model NAME (repeat for several on one base)")
    ap.add_argument("--model", help="the base model (default: the one the first adapter records)")
    ap.add_argument("--base_name", default="base", help="the model name of the base alone (default: base)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    ap.add_argument("--max_batch_size", type=int, default=16, help="sequences per model in one forward")
    ap.add_argument("--max_queue", type=int, default=64, help="sequences waiting beyond the batch slots; more: 429")
    ap.add_argument("--max_model_len", type=int, default=None,
                    help="prompt + reply tokens (default: the model's max_position_embeddings)")
    ap.add_argument("--drain_timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--host_memory", choices=HOST_MEMORY, default="keep",
                    help="keep: freed host memory is reused for the next tensor (runtime/host_memory.py), so the "
                         "server's memory stays at its peak instead of being page-faulted again each request")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of the forwards (default: torch's, one per core; fewer on a shared machine)")
    ap.add_argument("--log_level", default="warning", choices=("debug", "info", "warning", "error"),
                    help="uvicorn's log level (info: one line per request)")
    return ap


def adapter_dirs(specs: list[str], base_name: str) -> dict[str, Path]:
    """--adapter NAME=DIR ... -> {NAME: DIR}; ConfigError naming a malformed or repeated one."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR (e.g. adamole=runs/default/adapter)")
        if name in out or name == base_name:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is already taken"
                              + (" by the base model (--base_name)" if name == base_name else ""))
        out[name] = Path(folder)
    return out


def check_args(args) -> dict[str, Path]:
    adapters = adapter_dirs(args.adapter, args.base_name)
    if not adapters and not args.model:
        raise ConfigError("--adapter NAME=DIR or --model is required")
    for name in ("max_batch_size", "max_model_len", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} ({value}) must be >= 1")
    if args.max_queue < 0 or args.drain_timeout < 0:
        raise ConfigError(f"--max_queue ({args.max_queue}) and --drain_timeout ({args.drain_timeout}) must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port ({args.port}) must be in [0, 65535]")
    return adapters


def prepare(args):
    """(the application, the engine, the bound socket): every check, the models loaded, the port bound."""
    adapters = check_args(args)
    from adamole_dist.serving.app import build_app
    from adamole_dist.serving.engine import Engine
    from adamole_dist.serving.models import load_served_models, max_model_len
    from adamole_dist.serving.server import bind

    try:  # first: a port in use fails before minutes of loading; clients that come early wait in the backlog
        sock = bind(args.host, args.port)
    except OSError as e:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    if args.host_memory == "keep":
        from adamole_dist.runtime.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # before the model loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        models = load_served_models(args.model, adapters, args.base_name, args.device, args.dtype)
        engine = Engine(models, args.base_name, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                        max_model_len=max_model_len(models, args.max_model_len))
    except BaseException:
        sock.close()
        raise
    return build_app(engine, args.api_key or os.environ.get(API_KEY_ENV)), engine, sock


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: adamole-serve needs FastAPI and uvicorn: pip install -e '.[serve]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        app, engine, sock = prepare(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from adamole_dist.serving.server import make_server, url_of

    print(f"adamole-serve: {', '.join(engine.models)} on {url_of(sock)} (max_model_len {engine.max_model_len})",
          flush=True)
    make_server(app, engine, args.drain_timeout, args.log_level).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
