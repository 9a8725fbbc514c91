"""The asyncio side of the server: clients (``Session``), their messages, and the loop that hands the model the
newest chunk of every client at once (``Engine.tick``) and routes the restyled frames back.

Latency stays bounded whatever a client sends: frames beyond ``input_fps`` are dropped before decoding, the
inbox keeps the newest ``inbox_frames``, each tick takes only the newest chunk of a client (older frames are
stale), and the outbox keeps the newest ``outbox_frames``. Every drop is counted (``/api/metrics``).

Controls of a client run one at a time, in order, on a worker of its own; a newer prompt / noise_scale / steps /
taehv replaces one still waiting (its ack says how many it superseded). A client that leaves has its waiting
controls dropped at once: its stream is freed after at most the one control already running. The streams in
use (``/api/health``, the busy check) are those the engine holds, plus those being opened.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Optional

import numpy as np

from .engine import Busy, Engine, ReopenFailed
from .protocol import (ProtocolError, StreamOptions, bool_of, noise_scale_of, parse, prompt_of, start_options,
                       steps_of)
from .session import IDLE, PAUSED, RUNNING, STARTING, Session
from .settings import ServeSettings
from .stats import DROP_KINDS, Latency
from .wire import FrameError, decode_jpeg, encode_jpeg, pack_output, split_tag

log = logging.getLogger(__name__)

STATS_EVERY_S = 1.0


class Hub:
    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.info = engine.describe()
        self.sessions: dict[int, Session] = {}
        self._by_stream: dict[int, Session] = {}
        self._next_id = 0
        self._wake = asyncio.Event()
        self._loop_task: Optional[asyncio.Task] = None
        self.totals = {"connections": 0, "frames_in": 0, "frames_out": 0, "errors": 0, "busy_replies": 0,
                       "controls_superseded": 0, "dropped": {k: 0 for k in DROP_KINDS}}
        self.latency = Latency(settings.target_latency_ms)   # every client's frames (the server's SLO numbers)
        self.held: set[int] = set()      # ids of the streams the engine holds for clients
        self.releasing: set[int] = set() # of those, the ones whose close is queued on the engine's thread
        self.opening = 0                 # starts running now (their streams are not held yet)
        self.started_at = time.time()

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        for s in list(self.sessions.values()):
            await self.disconnect(s)

    @property
    def active_streams(self) -> int:
        """Streams in use: held by the engine (a closed client's too, until the engine let it go) or opening."""
        return len(self.held) + self.opening

    @property
    def streams_free(self) -> int:
        """Streams a start may take now: those whose close is already queued on the engine's thread count as
        free (the engine runs calls in order: a start queued now opens after that close)."""
        return self.settings.max_streams - (len(self.held - self.releasing) + self.opening)

    # ------------------------------------------------------------------ connections
    def connect(self, ws) -> Optional[Session]:
        if len(self.sessions) >= self.settings.max_connections:
            self.totals["busy_replies"] += 1
            return None
        s = Session(self._next_id, ws, input_fps=self.settings.input_fps,
                    inbox_frames=max(self.settings.inbox_frames, self.engine.first_chunk),
                    outbox_frames=self.settings.outbox_frames, target_latency_ms=self.settings.target_latency_ms)
        self._next_id += 1
        self.sessions[s.id] = s
        self.totals["connections"] += 1
        return s

    async def disconnect(self, s: Session) -> None:
        """The client is gone: its waiting controls are dropped, and its stream (KV rows) is freed as soon as the
        control running now (if any) and the engine's current step end."""
        if self.sessions.pop(s.id, None) is None:
            return
        s.closed = True
        self.totals["controls_superseded"] += sum(1 + c[2] for c in s.controls)
        self.opening -= sum(1 for c in s.controls if c[0] == "start")   # starts that will never run
        s.controls.clear()
        s.out_ready.set()
        s.publish(b"")
        st = s.stats
        self.totals["frames_in"] += st.received
        self.totals["frames_out"] += st.sent
        self.totals["errors"] += st.errors
        for k, v in st.dropped.items():
            self.totals["dropped"][k] += v
        running = [t for t in (s.control_task, *s.tasks) if t is not None]
        await asyncio.gather(*running, return_exceptions=True)   # the one control running ends before the close
        await self._close_stream(s)
        log.info("session %d closed: %d frames in, %d out, dropped %s", s.id, st.received, st.sent, st.dropped)

    async def _close_stream(self, s: Session) -> None:
        stream, s.stream, s.state = s.stream, None, IDLE
        s.inbox.clear()
        s.pending.clear()
        if stream is not None:
            self._by_stream.pop(stream.id, None)
            await self._release(stream)

    async def _release(self, stream) -> None:
        self.releasing.add(stream.id)
        try:
            await self.engine.call(self.engine.close, stream)
        finally:
            self.held.discard(stream.id)
            self.releasing.discard(stream.id)

    # ------------------------------------------------------------------ messages
    async def on_message(self, s: Session, text: Optional[str], data: Optional[bytes]) -> None:
        size = len(data) if data is not None else len(text.encode("utf-8", "surrogatepass")) if text else 0
        try:
            if size > self.settings.max_message_bytes:
                raise ProtocolError("oversize", f"message of {size} bytes is over serve.max_message_bytes="
                                                f"{self.settings.max_message_bytes}; send smaller JPEGs")
            if data is not None:
                await self._on_frame(s, data)
            else:
                self._on_control(s, parse(text or ""))
        except (ProtocolError, FrameError) as exc:
            await s.send_json({"type": "error", "code": exc.code, "message": str(exc)})
        except Exception as exc:  # a bug must not end the connection (nor touch the other clients)
            log.exception("session %d: message failed", s.id)
            await s.send_json({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})

    async def _on_frame(self, s: Session, data: bytes) -> None:
        now = time.perf_counter()
        if s.state == IDLE:
            raise ProtocolError("not_started", "a frame before the stream started: send {\"type\": \"start\"} first")
        s.stats.received += 1
        if s.state == PAUSED:
            return
        if not s.throttle.allow(now):
            s.stats.drop("throttled")
            return
        tag, jpeg = split_tag(data, s.stats.received - 1)
        frame, resized = await asyncio.to_thread(
            decode_jpeg, jpeg, self.engine.height, self.engine.width, resize=self.settings.resize,
            max_pixels=self.settings.max_frame_pixels)
        if resized and not s.said_resized:
            s.said_resized = True
            await s.send_json({"type": "info", "message": f"frames are centre-cropped and resized to "
                                                          f"{self.engine.width}x{self.engine.height} (the model's size)"})
        if s.state in (RUNNING, STARTING):
            s.queue_input(frame, tag, now)
            s.stats.rate_in.add(1, now)
            self._wake.set()

    def _on_control(self, s: Session, msg: dict) -> None:
        kind = msg["type"]
        if kind == "start":
            if s.state != IDLE:
                raise ProtocolError("bad_state", "the stream is already started: send {\"type\": \"stop\"} first")
            opts = start_options(msg, default_prompt=self.settings.default_prompt,
                                 default_steps=self.engine.default_steps, default_noise=self.engine.default_noise,
                                 max_steps=self.engine.max_steps)
            if self.streams_free <= 0:
                self.totals["busy_replies"] += 1
                s.spawn(s.send_json(self._busy_reply(f"all {self.settings.max_streams} streams are in use")))
                return
            s.state = STARTING
            self.opening += 1                       # counted from now, so that two starts cannot both pass
            self._queue(s, "start", opts)
            return
        if s.state == IDLE:
            raise ProtocolError("not_started", f"{kind!r} before the stream started: send {{\"type\": \"start\"}} first")
        if kind == "prompt":
            value = prompt_of(msg)
        elif kind == "noise_scale":
            value = noise_scale_of(msg.get("value"))
        elif kind == "steps":
            value = steps_of(msg.get("value"), self.engine.max_steps)
        elif kind == "taehv":
            value = bool_of(msg.get("on"), "on")
        else:                                       # pause, resume, stop
            value = None
        self._queue(s, kind, value)

    def _queue(self, s: Session, kind: str, value) -> None:
        if s.closed:
            return
        if s.queue_control(kind, value):
            s.control_task = asyncio.get_running_loop().create_task(self._controls(s))

    async def _controls(self, s: Session) -> None:
        """The client's controls, one at a time, in order, until none waits (or the client left)."""
        while s.controls and not s.closed:
            kind, value, superseded = s.controls.popleft()
            self.totals["controls_superseded"] += superseded
            try:
                if kind == "start":
                    await self._start(s, value)
                elif kind in ("prompt", "noise_scale", "steps", "taehv"):
                    await self._set(s, kind, value, superseded)
                elif kind in ("pause", "resume"):
                    await self._pause(s, kind == "pause")
                elif kind == "stop":
                    await self._stop(s)
                elif kind == "recover":
                    await self._recover(s, value)
            except ProtocolError as exc:
                await s.send_json(exc.reply())
            except Exception as exc:  # a model-side failure of one client's control: that client hears of it
                log.exception("session %d: control %s failed", s.id, kind)
                await s.send_json({"type": "error", "code": "engine", "message": f"{type(exc).__name__}: {exc}"})

    def _busy_reply(self, why: str) -> dict:
        return {"type": "busy", "message": f"the server is busy: {why} (serve.max_streams="
                                           f"{self.settings.max_streams}); try again when one ends",
                "max_streams": self.settings.max_streams}

    async def _start(self, s: Session, opts: StreamOptions) -> None:
        try:
            stream = await self.engine.call(self.engine.open, opts)
            self.held.add(stream.id)
        except Busy as exc:
            s.state = IDLE
            self.totals["busy_replies"] += 1
            await s.send_json(self._busy_reply(str(exc)))
            return
        except ValueError as exc:
            s.state = IDLE
            raise ProtocolError("bad_value", str(exc)) from None
        except BaseException:
            s.state = IDLE
            raise
        finally:
            self.opening -= 1
        if s.closed:           # gone while the stream opened
            await self._release(stream)
            return
        s.opts = opts
        s.restarted(stream, self.engine.first_chunk)
        self._by_stream[stream.id] = s
        s.state = RUNNING
        log.info("session %d: stream %d started (steps %d, noise %.2f, taehv %s, prompt %r)", s.id, stream.id,
                 opts.steps, opts.noise_scale, opts.taehv, opts.prompt)
        await s.send_json({"type": "started", "session": s.id, "stream": stream.id, **self.info,
                           "prompt": opts.prompt, "steps": opts.steps, "noise_scale": opts.noise_scale,
                           "taehv": opts.taehv, "output": opts.output, "input_fps": self.settings.input_fps,
                           "mjpeg": f"/api/stream/{s.token}.mjpg"})
        self._wake.set()

    async def _set(self, s: Session, what: str, value, superseded: int = 0) -> None:
        if s.stream is None:
            raise ProtocolError("not_started", f"{what!r}: the stream has stopped; start it again")
        ack = {"type": "ack", "control": what, what: value}
        if superseded:
            ack["superseded"] = superseded          # newer ones of this kind arrived while it waited
        if what == "prompt":
            await self.engine.call(self.engine.set_prompt, s.stream, value)
            s.opts = replace(s.opts, prompt=value)
            await s.send_json(ack)
            return
        if what == "noise_scale":
            await self.engine.call(self.engine.set_noise_scale, s.stream, value)
            s.opts = replace(s.opts, noise_scale=value)
            await s.send_json(ack)
            return
        new = replace(s.opts, **{what: value})
        if new == s.opts:
            await s.send_json({**ack, "restarted": False})
            return
        try:
            stream = await self._reopen(s, new)
        except ReopenFailed as exc:
            code = "busy" if isinstance(exc.cause, Busy) else "bad_value"
            raise ProtocolError(code, f"{what}={value!r} could not be applied ({exc}); the stream restarted with "
                                      f"the previous settings") from None
        log.info("session %d: %s=%s, stream restarted as %d", s.id, what, value, stream.id)
        await s.send_json({**ack, "restarted": True, "stream": stream.id})

    async def _reopen(self, s: Session, opts: StreamOptions):
        """Restart the client's stream with ``opts`` (on ``ReopenFailed``: with its previous options)."""
        old = s.stream
        self._by_stream.pop(old.id, None)
        try:
            stream = await self.engine.call(self.engine.reopen, old, opts, s.opts)
        except ReopenFailed as exc:
            stream = exc.restored
            raise
        except BaseException:               # not even the previous options opened: the stream has ended
            s.stream, s.state = None, IDLE
            raise
        else:
            s.opts = opts
        finally:
            self.held.discard(old.id)
            if s.stream is old:
                self.held.add(stream.id)
                s.restarted(stream, self.engine.first_chunk)
                self._by_stream[stream.id] = s
                self._wake.set()
        return stream

    async def _pause(self, s: Session, pause: bool) -> None:
        if s.state in (RUNNING, PAUSED):
            s.state = PAUSED if pause else RUNNING
            s.inbox.clear()
        await s.send_json({"type": "ack", "control": "pause" if pause else "resume", "state": s.state})
        self._wake.set()

    async def _stop(self, s: Session) -> None:
        await self._close_stream(s)
        await s.send_json({"type": "stopped"})

    # ------------------------------------------------------------------ the model loop
    async def _run(self) -> None:
        while True:
            if not await self._step():
                self._wake.clear()
                await self._wake.wait()

    async def _step(self) -> bool:
        """One engine tick for every client with a chunk ready (its newest frames); False when none has one.
        (A method of its own, so that nothing of a tick stays referenced while the loop waits.)"""
        if not any(s.has_chunk() for s in self.sessions.values()):
            return False
        if self.settings.batch_wait_ms > 0 and any(s.state == RUNNING and s.inbox and not s.has_chunk()
                                                   for s in self.sessions.values()):
            await asyncio.sleep(self.settings.batch_wait_ms / 1e3)   # once: let nearly ready clients join this step
        work = [(s, s.stream, s.take_chunk()) for s in self.sessions.values() if s.has_chunk()]
        batch = [(stream, np.stack(frames)) for _, stream, frames in work]
        try:
            result = await self.engine.call(self.engine.tick, batch)
        except Exception as exc:
            log.exception("the model step failed for streams %s", [st.id for _, st, _ in work])
            for s, stream, _ in work:
                if s.stream is stream:
                    self._queue(s, "recover", exc)
            return True
        for stream_id, why in result.failed.items():   # bad numbers in one stream: that stream restarts
            s = self._by_stream.get(stream_id)
            if s is not None and s.stream is not None and s.stream.id == stream_id:
                self._queue(s, "recover", why)
        for stream_id, frames in result.outputs:
            s = self._by_stream.get(stream_id)
            if s is not None and s.stream is not None and s.stream.id == stream_id:
                s.queue_output(frames)
        for stream_id, needed in result.needed.items():
            s = self._by_stream.get(stream_id)
            if s is not None and s.stream is not None and s.stream.id == stream_id:
                s.needed = needed
        return True

    async def _recover(self, s: Session, exc: Exception) -> None:
        """After a failed step (or bad numbers in the stream) its state is unknown: restart it, same settings."""
        await s.send_json({"type": "error", "code": "engine", "message": f"the model failed on this stream "
                                                                         f"({type(exc).__name__}: {exc}); restarting it"})
        if s.stream is not None:
            await self._reopen(s, s.opts)

    # ------------------------------------------------------------------ frames out
    async def send_loop(self, s: Session) -> None:
        """JPEG-encode the client's restyled frames and send them (WebSocket) or publish them (MJPEG); a stats
        message every second."""
        quality, last_stats = self.settings.jpeg_quality, time.perf_counter()
        while not s.closed:
            try:
                await asyncio.wait_for(s.out_ready.wait(), timeout=STATS_EVERY_S)
            except asyncio.TimeoutError:
                pass
            s.out_ready.clear()
            while s.outbox and not s.closed:
                frame, tag, arrival, index = s.outbox.popleft()
                jpeg = await asyncio.to_thread(encode_jpeg, frame, quality)
                now = time.perf_counter()
                server_ms = 1e3 * (now - arrival)
                s.publish(jpeg)
                if s.opts is None or s.opts.output == "ws":
                    if not await s.send_bytes(pack_output(jpeg, tag, index, server_ms)):
                        return
                s.stats.sent += 1
                s.stats.rate_out.add(1, now)
                s.stats.latency.add(server_ms)
                self.latency.add(server_ms)
            if time.perf_counter() - last_stats >= STATS_EVERY_S and s.state != IDLE:
                last_stats = time.perf_counter()
                await s.send_json({"type": "stats", **s.describe()})

    # ------------------------------------------------------------------ /api
    def health(self) -> dict:
        return {"status": "ok", **self.info, "streams": self.active_streams, "max_streams": self.settings.max_streams,
                "engine_streams": self.engine.streams_held,
                "connections": len(self.sessions), "input_fps": self.settings.input_fps,
                "max_message_bytes": self.settings.max_message_bytes, "jpeg_quality": self.settings.jpeg_quality,
                "default_prompt": self.settings.default_prompt, "uptime_s": round(time.time() - self.started_at, 1)}

    def metrics(self) -> dict:
        streams = [s.describe() for s in self.sessions.values() if s.state != IDLE]
        live = {"frames_in": sum(d["frames_in"] for d in streams), "frames_out": sum(d["frames_out"] for d in streams)}
        totals = dict(self.totals, dropped=dict(self.totals["dropped"]))
        for s in self.sessions.values():
            totals["frames_in"] += s.stats.received
            totals["frames_out"] += s.stats.sent
            totals["errors"] += s.stats.errors
            for k, v in s.stats.dropped.items():
                totals["dropped"][k] += v
        return {"weights": self.info["weights"], "streams": streams, "live": live, "totals": totals,
                "latency": self.latency.summary(), "engine": self.engine.stats(),
                "max_streams": self.settings.max_streams, "streams_in_use": self.active_streams}
