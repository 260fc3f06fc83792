"""adamole-serve as a process (launch/serve.py): SIGTERM stops it accepting, lets the request in flight finish
and exits 0; --drain_timeout bounds that wait; bad input exits 2 with one line before anything is served."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx", reason="the server's tests need the dev extra: pip install -e '.[dev]'")

from tests.helpers.saved_adapters import write_adapter_dir  # noqa: E402
from tests.helpers.serving import start_serve_process, write_serving_models  # noqa: E402
from tests.helpers.tiny_models import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_serving_models(tmp_path_factory.mktemp("serve_command"))


def stream_tokens(url: str, max_tokens: int, signal_after_first, results: dict) -> None:
    """Stream a completion; ``signal_after_first()`` once its first chunk came; results: chunks, whether it ended
    with [DONE], the finish reason."""
    body = {"model": "adamole", "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    results.update(chunks=0, done=False, finish=None)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    results["done"] = True
                elif line.startswith("data: "):
                    doc = json.loads(line[6:])
                    if doc["choices"]:
                        results["chunks"] += 1
                        results["finish"] = doc["choices"][0]["finish_reason"] or results["finish"]
                        if results["chunks"] == 1:
                            signal_after_first()
    except httpx.HTTPError as e:  # the drain timeout cut the stream
        results["error"] = repr(e)


def test_sigterm_drains_the_request_in_flight_and_exits_0(dirs):
    proc, url = start_serve_process("--adapter", f"adamole={dirs['adamole']}", "--drain_timeout", "60")
    try:
        results: dict = {}
        stream_tokens(url, 300, lambda: proc.send_signal(signal.SIGTERM), results)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert results == {"chunks": 300, "done": True, "finish": "length"}  # finished after the signal
    assert "draining" in proc.stderr.read()
    with pytest.raises(httpx.ConnectError):  # and it listens no more
        httpx.get(f"{url}/health")


@pytest.mark.slow
def test_the_drain_timeout_bounds_the_wait(dirs):
    proc, url = start_serve_process("--adapter", f"adamole={dirs['adamole']}", "--drain_timeout", "0.5")
    try:
        results: dict = {}
        stream_tokens(url, 2000, lambda: proc.send_signal(signal.SIGTERM), results)
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    assert results["chunks"] < 2000 and not results["done"]


def error_line(argv: list[str]) -> str:
    """main(argv) in this process (what the script runs): exit 2 and the one line it printed."""
    from adamole_dist.cli.serve import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_exits_2_with_one_line(dirs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adamole_dist.cli.serve", "--adapter", "no-equals-sign"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "NAME=DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    other = write_adapter_dir(tmp_path / "other", write_tiny_llama(tmp_path / "other_base", seed=4), "lora")
    assert f"b={other}" in error_line(["--adapter", f"a={dirs['adamole']}", "--adapter", f"b={other}"])
    assert "taken" in error_line(["--adapter", f"a={dirs['adamole']}", "--adapter", f"a={dirs['lora']}"])
    assert "--max_model_len" in error_line(["--adapter", f"a={dirs['adamole']}", "--max_model_len", "99999"])
    with socket_in_use() as port:
        assert f"--port {port}" in error_line(["--adapter", f"a={dirs['lora']}", "--port", str(port)])


@contextlib.contextmanager
def socket_in_use():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_python_dash_m_and_the_console_script_entry():
    done = subprocess.run([sys.executable, "-m", "adamole_dist.cli.serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:") and "--max_queue" in done.stdout
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[3] / "setup.py").read_text()
    assert '"adamole-serve = adamole_dist.cli.serve:main"' in setup and '"serve": ["fastapi", "uvicorn"]' in setup
