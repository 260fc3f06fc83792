"""Running the application under uvicorn on a socket bound beforehand (so ``--port 0`` picks a free port the
command can print, and a client that connects before uvicorn accepts waits in the backlog).

SIGTERM (and Ctrl-C) drain the server: uvicorn stops accepting connections, lets the requests in flight
finish for at most ``drain_timeout`` seconds (then cancels them, which cancels their sequences), runs the
application's shutdown (the scheduler thread stops), and returns; ``DrainingServer`` keeps uvicorn from
re-raising the signal afterwards, so the process exits 0 after a drain. While draining, GET /health says
"draining" and a request on a connection still open gets 503."""

from __future__ import annotations

import logging
import socket

import uvicorn

from adamole_dist.serving.engine import Engine


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one). OSError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server; a stop signal marks the engine as draining, and a drained server exits normally."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        if not self.engine.draining:
            logging.getLogger(__name__).warning("adamole-serve: signal %s: draining (no new requests; in-flight "
                                                "ones finish, at most --drain_timeout)", sig)
        self.engine.draining = True
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if captured:  # uvicorn would re-raise it after the shutdown, and the process would die of it
            captured.clear()


def make_server(app, engine: Engine, drain_timeout: float, log_level: str = "warning") -> DrainingServer:
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout, log_level=log_level, lifespan="on",
                            access_log=log_level in ("info", "debug"))
    return DrainingServer(config, engine)
