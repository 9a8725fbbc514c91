"""Timing with the project's one set of definitions (docs/metrics.md).

The driver marks every chunk's arrival (host time: when its last frame was available), every stage run (CUDA
events recorded on the stream the stage runs on; perf_counter on CPU) and every chunk leaving (an event after
its frames exist). A ``Clock`` puts both kinds of mark on one time axis: at its origin the device is idle, an
event is recorded and the host time taken, so an event's time is the origin's host time plus the GPU time
elapsed since the origin event. Nothing waits for the GPU until a summary is asked for.

* steady-state FPS: output frames / wall time over the outputs after warm-up (the first chunk and the first n
  chunks of an n-step stream batch excluded), between the end of the last warm-up output and the last output;
* end-to-end FPS: all output frames / (last output - first input);
* TTFF: buffering of the first chunk at the input rate (first-chunk frames / input fps) + compute until the
  first output frame exists (reported separately as ``ttff_compute_s``);
* per-chunk latency: from a chunk's last frame being available to its output existing (FIFO per stream);
* stage FPS: frames through a stage / time inside it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Mark:
    host: Optional[float] = None                 # perf_counter seconds
    event: Optional[torch.cuda.Event] = None     # a recorded CUDA event


class Clock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.origin_event = torch.cuda.Event(enable_timing=True)
            self.origin_event.record()
        self.origin_host = time.perf_counter()

    def host(self) -> Mark:
        return Mark(host=time.perf_counter())

    def now(self, stream: Optional[torch.cuda.Stream] = None) -> Mark:
        """A mark for 'when the device gets here' on ``stream`` (the current stream by default); host time on CPU."""
        if not self.cuda:
            return self.host()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return Mark(event=ev)

    def seconds(self, mark: Mark) -> float:
        """Seconds since the origin (waits for the event if it has not happened yet)."""
        if mark.event is not None:
            mark.event.synchronize()
            return self.origin_event.elapsed_time(mark.event) / 1e3
        return mark.host - self.origin_host


# ---------------------------------------------------------------------- what the driver emits
@dataclass
class ChunkIn:
    stream: int
    frames: int
    mark: Mark


@dataclass
class StageRun:
    name: str                      # encode | noise | dit | decode | text
    streams: list[int]
    frames: list[int]              # frames that went through, per stream
    start: Mark
    end: Mark


@dataclass
class ChunkOut:
    stream: int
    frames: torch.Tensor           # [T, H, W, 3] in [0, 1] on the device (ready after ``mark``)
    mark: Mark
    noise_scale: Optional[torch.Tensor] = None
    index: int = 0                 # the stream's output chunk number
    checks: Optional[tuple] = None # the input guard's (stream record, snapshot): StreamDriver.verify reads it


@dataclass
class StreamTimer:
    """Collects one stream's marks from the driver's events (subscribe its ``__call__``) and summarises them."""
    clock: Clock
    stream: Optional[int] = None   # None: every stream (totals)
    _stages: list = field(default_factory=list)
    _inputs: list = field(default_factory=list)
    _outputs: list = field(default_factory=list)

    def __call__(self, event) -> None:
        if isinstance(event, StageRun):
            if self.stream is None:
                self._stages.append((event.name, event.start, event.end, sum(event.frames)))
            elif self.stream in event.streams:
                self._stages.append((event.name, event.start, event.end, event.frames[event.streams.index(self.stream)]))
        elif self.stream is None or event.stream == self.stream:
            if isinstance(event, ChunkIn):
                self._inputs.append((event.stream, event.mark, event.frames))
            elif isinstance(event, ChunkOut) and event.frames.shape[0]:
                self._outputs.append((event.stream, event.mark, event.frames.shape[0]))

    def summary(self, *, warmup_chunks: int, input_fps: float, first_chunk_frames: int) -> dict:
        """All numbers of the stream(s). ``warmup_chunks``: outputs excluded from steady state (1 + (n - 1))."""
        if not self._inputs or not self._outputs:
            return {"output_frames": 0}
        sec = self.clock.seconds
        ins = [(s, sec(m), f) for s, m, f in self._inputs]
        outs = [(s, sec(m), f) for s, m, f in self._outputs]
        out: dict = {}
        t0 = min(t for _, t, _ in ins)
        total = sum(f for _, _, f in outs)
        last = max(t for _, t, _ in outs)
        out["output_frames"], out["chunks_out"] = total, len(outs)
        out["wall_s"] = last - t0
        out["e2e_fps"] = total / out["wall_s"] if out["wall_s"] > 0 else float("nan")
        steady = outs[warmup_chunks:]
        if len(steady) >= 2 or (steady and warmup_chunks > 0):
            ref = outs[warmup_chunks - 1][1] if warmup_chunks > 0 else steady[0][1]
            frames = sum(f for _, _, f in (steady if warmup_chunks > 0 else steady[1:]))
            dt = steady[-1][1] - ref
            out["steady_fps"] = frames / dt if dt > 0 else float("nan")
        else:   # not a number: n/a, with why (a NaN would read as a failed measurement)
            chunk = ins[1][2] if len(ins) > 1 and self.stream is not None else max(1, first_chunk_frames - 1)
            needed = first_chunk_frames + chunk * max(warmup_chunks, 1)
            out["steady_fps"] = None
            out["steady_fps_note"] = f"n/a: clip too short for a steady state (needs {needed} frames)"
        out["ttff_compute_s"] = min(t for _, t, _ in outs) - t0
        out["ttff_buffer_s"] = first_chunk_frames / input_fps
        out["ttff_s"] = out["ttff_compute_s"] + out["ttff_buffer_s"]
        lat = []
        by_stream_in: dict = defaultdict(list)
        for s, t, _ in ins:
            by_stream_in[s].append(t)
        seen: dict = defaultdict(int)
        for s, t, _ in outs:   # FIFO per stream
            k = seen[s]
            seen[s] += 1
            if k < len(by_stream_in[s]):
                lat.append(t - by_stream_in[s][k])
        out.update(latency_stats(lat))
        per_stage, stage_frames = defaultdict(float), defaultdict(int)
        for name, a, b, frames in self._stages:
            per_stage[name] += sec(b) - sec(a)
            stage_frames[name] += frames
        for name, secs in per_stage.items():
            out[f"{name}_s"] = secs
            if stage_frames[name] and secs > 0:
                out[f"{name}_fps"] = stage_frames[name] / secs
        return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_stats(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {}
    return {"latency_p50_ms": 1e3 * percentile(latencies_s, 50), "latency_p95_ms": 1e3 * percentile(latencies_s, 95),
            "latency_max_ms": 1e3 * max(latencies_s)}
