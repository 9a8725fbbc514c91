"""The ASGI app (FastAPI): the page, the WebSocket, MJPEG out and the two JSON endpoints.

    GET /                         the page (static HTML/JS/CSS from this package; no build step, no CDN)
    WS  /ws                       control messages (JSON) and frames (binary JPEG) in; frames and replies out
    GET /api/stream/<token>.mjpg  a client's restyled frames as multipart/x-mixed-replace (MJPEG), newest only
    GET /api/health               model, size, weights (dummy or real), streams in use
    GET /api/metrics              per stream and overall: FPS in/out, latency p50/p90/p95/p99/p99.9, deadline-miss
                                  rate against serve.target_latency_ms, jitter, dropped frames; engine step times
    GET /metrics                  the same numbers as Prometheus text

Every request (HTTP and WebSocket) must name this server in its Host header (``HostCheck``): a page of another
domain that re-resolves its name to this machine (DNS rebinding) sends its own domain there and is refused.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from .engine import Engine
from .hub import Hub
from .prometheus import CONTENT_TYPE, exposition
from .settings import ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MJPEG_BOUNDARY = "frame"


def same_origin(origin: str, host: str | None, allowed: list[str]) -> bool:
    """A browser's WebSocket may come from any page it has open: only the server's own page (or an origin in
    ``serve.allowed_origins``, "*" for any) may use the model. Clients that send no Origin (scripts) are allowed."""
    return "*" in allowed or origin in allowed or (host is not None and urlsplit(origin).netloc == host)


class HostCheck:
    """ASGI middleware: a request whose Host header does not name this server (``ServeSettings.host_allowed``: an
    IP address, localhost or ``serve.allowed_hosts``) gets 400 (HTTP) or a refused handshake (WebSocket, 403)."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings
        self._warned: set = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            if not self.settings.host_allowed(host):
                if host not in self._warned and len(self._warned) < 64:
                    self._warned.add(host)
                    log.warning("refused a request for host %r (not this server's address; serve.allowed_hosts)",
                                host)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = (f"Host {host!r} is not this server: it answers to its IP addresses, localhost and the names "
                        f"in serve.allowed_hosts\n").encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub = app.state.hub = Hub(engine, settings)       # made on the server's event loop
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(title="sdv2 serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(HostCheck, settings=settings)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    async def health():
        return JSONResponse(app.state.hub.health())

    @app.get("/api/metrics")
    async def metrics():
        return JSONResponse(app.state.hub.metrics())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return PlainTextResponse(exposition(app.state.hub), media_type=CONTENT_TYPE)

    @app.get("/api/stream/{token}.mjpg")
    async def mjpeg(token: str):
        hub: Hub = app.state.hub
        session = next((s for s in hub.sessions.values() if s.token == token), None)
        if session is None:
            return JSONResponse({"error": "no such stream (it ended, or the token is wrong)"}, status_code=404)
        return StreamingResponse(_mjpeg_parts(session), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket):
        hub: Hub = app.state.hub
        origin = ws.headers.get("origin")
        if origin and not same_origin(origin, ws.headers.get("host"), settings.allowed_origins):
            log.warning("refused a WebSocket from origin %s (not this server's page; serve.allowed_origins)", origin)
            await ws.close(code=1008)       # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept()
        session = hub.connect(ws)
        if session is None:
            await ws.send_json({"type": "busy", "message": f"the server is busy: {settings.max_connections} "
                                                           f"connections already (serve.max_connections)"})
            await ws.close(code=1013)
            return
        sender = asyncio.get_running_loop().create_task(hub.send_loop(session))
        try:
            await session.send_json({"type": "hello", **hub.health()})
            while not session.closed:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await hub.on_message(session, msg.get("text"), msg.get("bytes"))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            await hub.disconnect(session)
            sender.cancel()

    return app


async def _mjpeg_parts(session):
    """One multipart part per new frame; a slow viewer just skips frames (it always gets the newest)."""
    while not session.closed:
        event = session.new_jpeg
        try:
            await asyncio.wait_for(event.wait(), timeout=5.0)
        except asyncio.TimeoutError:
            continue
        jpeg = session.jpeg
        if session.closed or not jpeg:
            break
        yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode() \
            + jpeg + b"\r\n"
