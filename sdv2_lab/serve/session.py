"""One client on the asyncio side: its state, its bounded queues and its numbers. Nothing here touches the model.

    inbox    decoded input frames waiting for the model: at most ``inbox_frames``; the oldest go first (counted)
    pending  tags of the frames the model has, in order: output frame k restyles the k-th frame fed
    outbox   restyled frames waiting for the socket: at most ``outbox_frames``; the oldest go first (counted)
    controls control messages waiting to run, in order; a newer prompt / noise_scale / steps / taehv replaces one
             still waiting (latest wins), so a client that floods controls queues at most one of each kind
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any, Optional

from .protocol import StreamOptions
from .protocol import COALESCED
from .stats import Latency, StreamStats
from .wire import Tag

log = logging.getLogger(__name__)

IDLE, STARTING, RUNNING, PAUSED = "idle", "starting", "running", "paused"


class Throttle:
    """A token bucket: ``rate`` frames per second on average, bursts of 1/4 s of frames, at least 4 (a client that
    lagged and catches up, network jitter)."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate, self.burst = rate, max(4.0, rate / 4) if burst is None else burst
        self.tokens, self.last = self.burst, time.perf_counter()

    def allow(self, now: Optional[float] = None) -> bool:
        now = time.perf_counter() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Session:
    def __init__(self, sid: int, ws: Any, *, input_fps: float, inbox_frames: int, outbox_frames: int,
                 target_latency_ms: float = 1000.0):
        self.id = sid                                  # public (metrics)
        self.token = secrets.token_urlsafe(12)         # private (the MJPEG URL)
        self.ws = ws
        self.state = IDLE
        self.opts: Optional[StreamOptions] = None
        self.stream = None                             # the engine's Stream (read its .id only here)
        self.needed = 0
        self.inbox: deque = deque()                    # (frame uint8 [H, W, 3], Tag, arrival s)
        self.inbox_frames, self.outbox_frames = inbox_frames, outbox_frames
        self.pending: deque = deque()                  # (Tag, arrival s) of frames fed to the model
        self.outbox: deque = deque()                   # (frame uint8 [H, W, 3], Tag, arrival s, index)
        self.out_ready = asyncio.Event()
        self.throttle = Throttle(input_fps)
        self.stats = StreamStats(latency=Latency(target_latency_ms))
        self.frames_out = 0                            # output frame index
        self.said_resized = False
        self.closed = False
        self.controls: deque = deque()                 # [kind, value, superseded] waiting to run
        self.control_task: Optional[asyncio.Task] = None
        self.tasks: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()
        self.jpeg: Optional[bytes] = None              # the newest restyled frame (MJPEG)
        self.new_jpeg = asyncio.Event()

    # ------------------------------------------------------------------ queues
    def queue_input(self, frame, tag: Tag, arrival: float) -> None:
        if len(self.inbox) >= self.inbox_frames:
            self.inbox.popleft()
            self.stats.drop("stale")
        self.inbox.append((frame, tag, arrival))

    def has_chunk(self) -> bool:
        return self.state == RUNNING and self.stream is not None and self.needed > 0 and len(self.inbox) >= self.needed

    def take_chunk(self) -> list:
        """The newest ``needed`` frames (older ones are stale: dropped and counted); their tags go to ``pending``."""
        extra = len(self.inbox) - self.needed
        for _ in range(extra):
            self.inbox.popleft()
        if extra > 0:
            self.stats.drop("stale", extra)
        frames = [self.inbox.popleft() for _ in range(self.needed)]
        self.pending.extend((tag, arrival) for _, tag, arrival in frames)
        self.stats.fed += len(frames)
        return [f for f, _, _ in frames]

    def queue_output(self, frames) -> None:
        now = time.perf_counter()
        for frame in frames:
            tag, arrival = self.pending.popleft() if self.pending else (Tag(0xFFFFFFFF, 0.0), now)
            if len(self.outbox) >= self.outbox_frames:
                self.outbox.popleft()
                self.stats.drop("output")
            self.outbox.append((frame, tag, arrival, self.frames_out))
            self.frames_out += 1
        self.out_ready.set()

    def restarted(self, stream, needed: int) -> None:
        """A new engine stream for this client: the frames in flight in the old one are gone."""
        self.stream, self.needed = stream, needed
        self.pending.clear()

    def queue_control(self, kind: str, value) -> bool:
        """Queue a control; a waiting one of the same kind (prompt, noise_scale, steps, taehv) is replaced.
        Returns whether a worker must be started."""
        superseded = 0
        if kind in COALESCED:
            for i, c in enumerate(self.controls):
                if c[0] == kind:
                    superseded = c[2] + 1
                    del self.controls[i]
                    break
        self.controls.append([kind, value, superseded])
        return self.control_task is None or self.control_task.done()

    def publish(self, jpeg: bytes) -> None:
        """The newest frame for MJPEG viewers."""
        self.jpeg = jpeg
        event, self.new_jpeg = self.new_jpeg, asyncio.Event()
        event.set()

    # ------------------------------------------------------------------ sending (never raises: a gone client is closed)
    async def send_json(self, msg: dict) -> bool:
        if msg.get("type") == "error":
            self.stats.errors += 1
        return await self._send(self.ws.send_json, msg)

    async def send_bytes(self, data: bytes) -> bool:
        return await self._send(self.ws.send_bytes, data)

    async def _send(self, fn, payload) -> bool:
        if self.closed:
            return False
        try:
            async with self._send_lock:
                await fn(payload)
            return True
        except Exception as exc:  # disconnected mid-send (WebSocketDisconnect, ClientDisconnected, RuntimeError)
            log.debug("session %d: send failed (%s): closing", self.id, type(exc).__name__)
            self.closed = True
            return False

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def describe(self) -> dict:
        o = self.opts
        d = {"id": self.id, "state": self.state, "stream": None if self.stream is None else self.stream.id,
             "queued_in": len(self.inbox), "queued_out": len(self.outbox), "in_model": len(self.pending)}
        if o is not None:
            d.update(prompt=o.prompt, steps=o.steps, noise_scale=o.noise_scale, taehv=o.taehv, output=o.output)
        d.update(self.stats.summary())
        return d
