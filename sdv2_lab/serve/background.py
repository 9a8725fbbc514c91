"""The uvicorn configuration of ``sdv2 serve`` (TLS, a header timeout), and the server in a background thread of
this process on a free loopback port, for tests and the benchmark.

    with serve_in_thread(engine, settings) as url:     # "http://127.0.0.1:<port>" (https with serve.ssl_certfile)
        ...
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .engine import Engine
from .settings import ServeSettings

REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's head: a connection that starts a request and does not
    finish its headers within ``header_timeout`` seconds (a half-open request, a slowloris client) gets 408 and is
    closed. uvicorn itself times out idle keep-alive connections only, never a request in progress."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        scope = self.scope
        super().data_received(data)
        if self.scope is not scope:                      # a request's head arrived whole
            self._disarm()
        elif self.conn.their_state is h11.IDLE:          # the next request's head has begun (keep-alive)
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closed a connection whose request headers did not arrive within %g s "
                             "(serve.header_timeout_s)", self.header_timeout)
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


def uvicorn_config(app, settings: ServeSettings, **overrides) -> uvicorn.Config:
    # the socket's own limit sits above max_message_bytes, so a too-large frame gets an error message
    # (hub.on_message) instead of a closed socket
    protocol = type("SDV2H11Protocol", (HeaderTimeoutH11,), {"header_timeout": float(settings.header_timeout_s)})
    kw = dict(host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
              ws_max_size=4 * settings.max_message_bytes, ws_ping_interval=20, ws_ping_timeout=60,
              timeout_graceful_shutdown=2, ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile)
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
        yield f"{settings.scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
