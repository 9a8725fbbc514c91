"""Per-stream counters, frame rates over a sliding window and latency percentiles (docs/metrics.md: a frame's
latency here is from its arrival at the server to its restyled frame leaving the server)."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..stream.timing import percentile

DROP_KINDS = ("throttled", "stale", "output")


class Rate:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: float = 5.0):
        self.window, self.times = window, deque()

    def add(self, n: int = 1, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.times.extend([now] * n)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()

    def per_second(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        self._trim(now)
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(now - self.times[0], 1e-6) if now > self.times[0] else 0.0


@dataclass
class StreamStats:
    received: int = 0          # frames that arrived
    fed: int = 0               # frames given to the model
    sent: int = 0              # restyled frames sent (or published to MJPEG)
    errors: int = 0            # error replies
    dropped: dict = field(default_factory=lambda: {k: 0 for k in DROP_KINDS})
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=512))
    rate_in: Rate = field(default_factory=Rate)
    rate_out: Rate = field(default_factory=Rate)

    def drop(self, kind: str, n: int = 1) -> None:
        self.dropped[kind] += n

    def summary(self) -> dict:
        lat = list(self.latencies_ms)
        out = {"frames_in": self.received, "frames_fed": self.fed, "frames_out": self.sent,
               "fps_in": round(self.rate_in.per_second(), 2), "fps_out": round(self.rate_out.per_second(), 2),
               "dropped": dict(self.dropped), "dropped_total": sum(self.dropped.values()), "errors": self.errors}
        for q in (50, 95, 99):
            out[f"latency_p{q}_ms"] = round(percentile(lat, q), 1) if lat else None
        return out
