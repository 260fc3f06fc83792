"""A real adamole-serve server for tests: uvicorn on a loopback socket, in a thread of the test process (the
models are loaded once per test module and served by one server at a time), or the command itself in a
subprocess. Readiness is polled with a bound on the number of polls; nothing is timed."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.launch_utils import REPO, launch_env
from tests.helpers.saved_adapters import CHAT_TEMPLATE, write_adapter_dir
from tests.helpers.tiny_models import write_tiny_llama

SERVE = REPO / "launch" / "serve.py"
POLLS = 600  # x 0.05 s: how long a server may take to come up before a test gives up


def write_serving_models(root: Path, max_positions: int = 2048) -> dict:
    """A tiny Llama base (long positions) and adapters on it: {"base": dir, "adamole" (chat, with its own
    template), "lora" (plain text), "mole_topk"}."""
    base = write_tiny_llama(root / "base", max_positions=max_positions)
    chat = {"prompt_format": "chat", "chat_template": CHAT_TEMPLATE}
    return {"base": base,
            "adamole": write_adapter_dir(root / "adamole", base, "adamole", seed=1, meta=chat),
            "lora": write_adapter_dir(root / "lora", base, "lora", seed=2),
            "mole_topk": write_adapter_dir(root / "mole_topk", base, "mole_topk", seed=3)}


@contextmanager
def running_server(models: dict, *, base_name: str = "base", max_batch_size: int = 16, max_queue: int = 64,
                   max_model_len: int = 2048, api_key: str | None = None, drain_timeout: float = 5.0):
    """(base URL, engine) of a server on 127.0.0.1, any free port, for the ``with`` block."""
    from adamole_dist.serving.app import build_app
    from adamole_dist.serving.engine import Engine
    from adamole_dist.serving.server import bind, make_server, url_of

    engine = Engine(models, base_name, max_batch_size=max_batch_size, max_queue=max_queue,
                    max_model_len=max_model_len)
    sock = bind("127.0.0.1", 0)
    server = make_server(build_app(engine, api_key), engine, drain_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(POLLS):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield url_of(sock), engine
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def start_serve_process(*args: str) -> tuple[subprocess.Popen, str]:
    """``launch/serve.py ARGS --port 0`` in a subprocess, and its URL once it says where it listens."""
    proc = subprocess.Popen([sys.executable, str(SERVE), *map(str, args), "--port", "0"], env=launch_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.search(r" on (http://\S+) ", line)
        if match:
            return proc, match.group(1)
    proc.wait(60)
    raise AssertionError(f"serve.py exited {proc.returncode} before listening: {proc.stderr.read()[-3000:]}")
