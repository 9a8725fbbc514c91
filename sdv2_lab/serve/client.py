"""A scripted client (no browser): synthetic frames at a fixed rate over the WebSocket, restyled frames back,
latency measured on the client's own clock from the echoed tag. Used by the load tests and
``experiments/bench_serve.py``.

    result = asyncio.run(run_client("ws://127.0.0.1:7860/ws", seconds=10, fps=16, height=480, width=832))
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..stream.timing import percentile
from .wire import encode_jpeg, pack_input, unpack_output


def synthetic_jpegs(n: int, height: int, width: int, quality: int = 85, seed: int = 0) -> list[bytes]:
    """``n`` JPEG frames of a moving, colour-shifting pattern (made once: the client's CPU stays free)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=(3,)).astype(np.float32)
    frames = []
    for k in range(n):
        phase = 2 * np.pi * k / n
        r = 127 + 120 * np.sin(xx / max(width, 1) * 6 + phase)
        g = 127 + 120 * np.sin(yy / max(height, 1) * 4 - phase)
        b = (base[2] + 4 * k + 0 * xx) % 255
        img = np.stack([r, g, b], axis=-1)
        x0 = int((k / n) * width)                     # a bright bar sweeping across
        img[:, x0:x0 + max(2, width // 16)] = 255
        frames.append(encode_jpeg(img.clip(0, 255).astype(np.uint8), quality))
    return frames


@dataclass
class ClientResult:
    name: str
    started: bool = False
    busy: bool = False
    sent: int = 0
    received: int = 0
    errors: list = field(default_factory=list)
    latencies_ms: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)       # perf_counter of each output frame
    server_stats: dict = field(default_factory=dict)   # the last stats message
    first_output_s: Optional[float] = None             # from the first frame sent

    def summary(self, warmup_s: float = 0.0) -> dict:
        """Numbers over the outputs after the first ``warmup_s`` seconds of output (FPS and latency)."""
        keep = [i for i, a in enumerate(self.arrivals) if a >= self.arrivals[0] + warmup_s]
        t = [self.arrivals[i] for i in keep]
        fps = (len(t) - 1) / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else 0.0
        lat = [self.latencies_ms[i] for i in keep]
        dropped = self.server_stats.get("dropped", {})
        return {"client": self.name, "started": self.started, "busy": self.busy, "sent": self.sent,
                "received": self.received, "fps_out": round(fps, 2),
                "latency_p50_ms": round(percentile(lat, 50), 1) if lat else None,
                "latency_p95_ms": round(percentile(lat, 95), 1) if lat else None,
                "latency_p99_ms": round(percentile(lat, 99), 1) if lat else None,
                "latency_max_ms": round(max(lat), 1) if lat else None,
                "first_output_s": None if self.first_output_s is None else round(self.first_output_s, 2),
                "dropped": dropped, "dropped_total": sum(dropped.values()) if dropped else 0,
                "errors": len(self.errors)}


async def run_client(url: str, *, seconds: float, fps: float, height: int, width: int, name: str = "client",
                     prompt: str = "a watercolor painting", steps: Optional[int] = None, seed: Optional[int] = None,
                     frames: Optional[list[bytes]] = None, start_timeout: float = 120.0,
                     drain_s: float = 2.0) -> ClientResult:
    """Connect, start a stream, send frames at ``fps`` for ``seconds``, keep receiving ``drain_s`` more."""
    from websockets.asyncio.client import connect

    frames = frames or synthetic_jpegs(32, height, width)
    res = ClientResult(name)
    async with connect(url, max_size=None, open_timeout=30) as ws:
        start = {"type": "start", "prompt": prompt}
        if steps is not None:
            start["steps"] = steps
        if seed is not None:
            start["seed"] = seed
        await ws.send(json.dumps(start))
        deadline = time.perf_counter() + start_timeout
        while not res.started:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.perf_counter())))
            if msg["type"] == "started":
                res.started = True
            elif msg["type"] == "busy":
                res.busy = True
                return res
            elif msg["type"] == "error":
                res.errors.append(msg)
                return res
        t_first_send: list[float] = []

        async def receive(stop_at: list[float]):
            while True:
                timeout = stop_at[0] - time.perf_counter()
                if timeout <= 0:
                    return
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout=timeout)
                except asyncio.TimeoutError:
                    return
                now = time.perf_counter()
                if isinstance(msg, bytes):
                    tag, _, _, _ = unpack_output(msg)
                    res.received += 1
                    res.arrivals.append(now)
                    res.latencies_ms.append(1e3 * now - tag.client_ms)
                    if res.first_output_s is None and t_first_send:
                        res.first_output_s = now - t_first_send[0]
                else:
                    m = json.loads(msg)
                    if m["type"] == "stats":
                        res.server_stats = m
                    elif m["type"] == "error":
                        res.errors.append(m)

        stop_at = [float("inf")]
        receiver = asyncio.get_running_loop().create_task(receive(stop_at))
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            now = time.perf_counter()
            if not t_first_send:
                t_first_send.append(now)
            await ws.send(pack_input(frames[k % len(frames)], k, 1e3 * now))
            res.sent += 1
            k += 1
            await asyncio.sleep(max(0.0, t0 + k / fps - time.perf_counter()))
        stop_at[0] = time.perf_counter() + drain_s
        await receiver
    return res
