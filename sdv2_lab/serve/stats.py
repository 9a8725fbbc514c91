"""Per-stream counters, frame rates over a sliding window and latency percentiles, deadline misses and jitter
(docs/metrics.md: a frame's latency here is from its arrival at the server to its restyled frame leaving the
server)."""
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


QUANTILES = (50, 90, 95, 99, 99.9)


def quantile_key(q: float) -> str:
    return f"latency_p{q:g}_ms".replace(".", "_")        # latency_p99_9_ms


class Latency:
    """Per-frame latencies (ms) against a target: a recent window for the percentiles, the deadline-miss rate and
    the jitter (mean |difference| of consecutive frames' latencies), and running totals (Prometheus counters)."""

    def __init__(self, target_ms: float, window: int = 1024):
        self.target_ms = float(target_ms)
        self.recent: deque = deque(maxlen=window)
        self.count, self.sum_ms, self.misses = 0, 0.0, 0

    def add(self, ms: float) -> None:
        self.recent.append(ms)
        self.count += 1
        self.sum_ms += ms
        self.misses += ms > self.target_ms

    def summary(self) -> dict:
        lat = list(self.recent)
        out = {quantile_key(q): (round(percentile(lat, q), 1) if lat else None) for q in QUANTILES}
        out["deadline_miss_rate"] = round(sum(x > self.target_ms for x in lat) / len(lat), 4) if lat else None
        out["jitter_ms"] = (round(sum(abs(b - a) for a, b in zip(lat, lat[1:])) / (len(lat) - 1), 1)
                            if len(lat) > 1 else None)
        out["target_latency_ms"] = self.target_ms
        return out


@dataclass
class StreamStats:
    received: int = 0          # frames that arrived
    fed: int = 0               # frames given to the model
    sent: int = 0              # restyled frames sent (or published to MJPEG)
    errors: int = 0            # error replies
    dropped: dict = field(default_factory=lambda: {k: 0 for k in DROP_KINDS})
    latency: Latency = field(default_factory=lambda: Latency(1000.0))
    rate_in: Rate = field(default_factory=Rate)
    rate_out: Rate = field(default_factory=Rate)

    def drop(self, kind: str, n: int = 1) -> None:
        self.dropped[kind] += n

    def summary(self) -> dict:
        out = {"frames_in": self.received, "frames_fed": self.fed, "frames_out": self.sent,
               "fps_in": round(self.rate_in.per_second(), 2), "fps_out": round(self.rate_out.per_second(), 2),
               "dropped": dict(self.dropped), "dropped_total": sum(self.dropped.values()), "errors": self.errors}
        out.update(self.latency.summary())
        return out
