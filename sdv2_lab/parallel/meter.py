"""A stage's busy time per job: what the block scheduler balances and what the results row reports.

Marks come from the driver's ``Clock`` (CUDA events on GPU, perf_counter on CPU): the stage's own DiT work
(``blocks``: its share of the transformer; ``dit``: embedding, head, x0 / re-noising) and, through the
driver's stage events, VAE ``encode`` (first stage) and ``decode`` (last stage). Waiting for a peer is not
busy time. Nothing here waits for the GPU on the per-chunk path: events are turned into times only for jobs
that are long finished (the block scheduler reads a window one window late) or at the end of a clip.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

from ..stream.timing import Clock, Mark, StageRun

KINDS = ("blocks", "dit", "encode", "decode")


class StageMeter:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.jobs: dict[int, dict[str, list]] = {}     # job number -> kind -> [(start mark, end mark)]
        self.current: Optional[int] = None
        self._times: dict[int, dict[str, float]] = {}    # resolved seconds per job and kind
        self.frames: dict[int, dict[str, int]] = {}       # frames through the VAE per job and kind
        self.keep = 4096                                  # jobs remembered (a long stream stays bounded)

    def now(self) -> Mark:
        return self.clock.now()

    def start_job(self, number: int) -> None:
        self.current = number
        self.jobs[number] = defaultdict(list)
        if len(self.jobs) > self.keep:
            for old in sorted(self.jobs)[: len(self.jobs) - self.keep]:
                self.jobs.pop(old)
                self._times.pop(old, None)
                self.frames.pop(old, None)

    def add(self, kind: str, start: Mark, end: Mark) -> None:
        if self.current is not None:
            self.jobs[self.current][kind].append((start, end))

    def on_event(self, event) -> None:
        """The driver's listener: its encode / decode runs count toward the job in progress."""
        if isinstance(event, StageRun) and event.name in ("encode", "decode", "noise"):
            kind = "encode" if event.name == "noise" else event.name
            self.add(kind, event.start, event.end)
            if self.current is not None:
                per = self.frames.setdefault(self.current, defaultdict(int))
                per[kind] += sum(event.frames)

    # ------------------------------------------------------------------ reading
    def _ready(self, mark: Mark) -> bool:
        return mark.event is None or mark.event.query()

    def times(self, number: int) -> Optional[dict[str, float]]:
        """Seconds per kind of one job, or None while its GPU work is not finished."""
        if number in self._times:
            return self._times[number]
        marks = self.jobs.get(number)
        if marks is None:
            return None
        if not all(self._ready(b) for spans in marks.values() for _, b in spans):
            return None
        sec = self.clock.seconds
        out = {k: sum(sec(b) - sec(a) for a, b in marks.get(k, ())) for k in KINDS}
        spans = [(sec(a), sec(b)) for v in marks.values() for a, b in v]
        out["start"] = min((a for a, _ in spans), default=math.nan)
        out["end"] = max((b for _, b in spans), default=math.nan)
        self._times[number] = out
        return out

    def window(self, lo: int, hi: int) -> tuple[float, float]:
        """Median (stage ms, blocks ms) per job over jobs [lo, hi) (a median: one slow job, e.g. a stream's first,
        does not move blocks); NaN when some are not finished yet."""
        got = [self.times(j) for j in range(lo, hi)]
        if not got or any(g is None for g in got):
            return math.nan, math.nan

        def median(values):
            v = sorted(values)
            return 0.5 * (v[(len(v) - 1) // 2] + v[len(v) // 2])

        stage = median([g["blocks"] + g["dit"] + g["encode"] + g["decode"] for g in got])
        return 1e3 * stage, 1e3 * median([g["blocks"] for g in got])

    def summary(self, skip: int = 0) -> dict:
        """Per job means (ms) over the jobs since the last summary after the first ``skip``, and the bubble
        fraction (1 - busy / span on this rank). Waits for the GPU (the end of a clip). Forgets those jobs."""
        every = [(j, self._resolve(j)) for j in sorted(self.jobs)]
        got = [t for _, t in every[skip:] if t is not None]
        # VAE rates over every job (warm-up too, as the driver's stage rates): a short clip has few after it
        vae = {k: (sum(self.frames.get(j, {}).get(k, 0) for j, _ in every),
                   sum(t[k] for _, t in every if t is not None)) for k in ("encode", "decode")}
        self.jobs.clear()
        self._times.clear()
        self.frames.clear()
        self.current = None
        if not got:
            return {}
        out = {f"{k}_ms": 1e3 * sum(g[k] for g in got) / len(got) for k in KINDS}
        for k, (frames, secs) in vae.items():   # frames per second of this rank's VAE work (where it runs)
            out[f"{k}_fps"] = frames / secs if frames and secs > 0 else None
        busy = sum(g["blocks"] + g["dit"] + g["encode"] + g["decode"] for g in got)
        out["stage_ms"] = 1e3 * busy / len(got)
        span = max(g["end"] for g in got) - min(g["start"] for g in got)
        out["bubble"] = max(0.0, 1 - busy / span) if span > 0 else None
        for k in ("encode_ms", "decode_ms"):
            if not out[k]:
                out[k] = None
        return out

    def _resolve(self, number: int) -> Optional[dict]:
        for spans in self.jobs[number].values():
            for _, b in spans:
                if b.event is not None:
                    b.event.synchronize()
        return self.times(number)
