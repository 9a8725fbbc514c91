"""The server in a background thread of this process, on a free loopback port: for tests and the benchmark.

    with serve_in_thread(engine, settings) as url:     # "http://127.0.0.1:<port>"
        ...
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from .app import create_app
from .engine import Engine
from .settings import ServeSettings


def uvicorn_config(app, settings: ServeSettings, **overrides) -> uvicorn.Config:
    # the socket's own limit sits above max_message_bytes, so a too-large frame gets an error message
    # (hub.on_message) instead of a closed socket
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
              ws_max_size=4 * settings.max_message_bytes, ws_ping_interval=20, ws_ping_timeout=60,
              timeout_graceful_shutdown=2)
    kw.update(overrides)
    return uvicorn.Config(app, **kw)


@contextlib.contextmanager
def serve_in_thread(engine: Engine, settings: ServeSettings, *, start_timeout: float = 60.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(engine, settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sdv2-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
