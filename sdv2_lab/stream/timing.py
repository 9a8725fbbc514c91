"""Stage and chunk timing with the project's one set of definitions (design.md "How numbers are defined").

On GPU every mark is a CUDA event (nothing waits for the GPU until ``summary()``); on CPU, perf_counter.

* steady-state FPS: output frames / wall time over the outputs after warm-up (the first chunk and the first n
  chunks of an n-step stream batch excluded), between the end of the last warm-up output and the last output;
* end-to-end FPS: all output frames / (last output - first input);
* TTFF: buffering of the first chunk at the input rate (first-chunk frames / input fps) + compute until the
  first output frame exists (reported separately as ``ttff_compute_s``);
* per-chunk latency: from a chunk entering the pipeline (its last frame available) to its output existing;
  outputs are matched to inputs in order (FIFO);
* stage FPS: frames through a stage / time inside it.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch


class _Mark:
    __slots__ = ("event", "t")

    def __init__(self, cuda: bool):
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
            self.t = None
        else:
            self.event = None
            self.t = time.perf_counter()

    def seconds_since(self, other: "_Mark") -> float:
        if self.event is not None:
            return other.event.elapsed_time(self.event) / 1e3
        return self.t - other.t


@dataclass
class StageTimer:
    device: torch.device = torch.device("cpu")
    _marks: list = field(default_factory=list)           # (kind, name, start mark, end mark, frames)
    _inputs: list = field(default_factory=list)          # (mark, frames) per chunk entering
    _outputs: list = field(default_factory=list)         # (mark, frames) per chunk leaving
    _origin: Optional[_Mark] = None

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _mark(self) -> _Mark:
        m = _Mark(self.cuda)
        if self._origin is None:
            self._origin = m
        return m

    @contextlib.contextmanager
    def stage(self, name: str, frames: int = 0):
        start = self._mark()
        yield
        self._marks.append((name, start, self._mark(), frames))

    def chunk_in(self, frames: int) -> None:
        self._inputs.append((self._mark(), frames))

    def chunk_out(self, frames: int) -> None:
        if frames:
            self._outputs.append((self._mark(), frames))

    def summary(self, *, warmup_chunks: int, input_fps: float, first_chunk_frames: int,
                frames_per_stage: Optional[dict] = None) -> dict:
        """All numbers of one stream. ``warmup_chunks``: outputs excluded from steady state (1 + (n - 1))."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict = {}
        if not self._inputs or not self._outputs:
            return {"output_frames": 0}
        t0 = self._inputs[0][0]
        total_frames = sum(f for _, f in self._outputs)
        last = self._outputs[-1][0]
        out["output_frames"] = total_frames
        out["chunks_out"] = len(self._outputs)
        out["wall_s"] = last.seconds_since(t0)
        out["e2e_fps"] = total_frames / out["wall_s"] if out["wall_s"] > 0 else float("nan")
        steady = self._outputs[warmup_chunks:]
        if len(steady) >= 2 or (steady and warmup_chunks > 0):
            ref = self._outputs[warmup_chunks - 1][0] if warmup_chunks > 0 else steady[0][0]
            frames = sum(f for _, f in (steady if warmup_chunks > 0 else steady[1:]))
            dt = steady[-1][0].seconds_since(ref)
            out["steady_fps"] = frames / dt if dt > 0 else float("nan")
        else:
            out["steady_fps"] = float("nan")
        out["ttff_compute_s"] = self._outputs[0][0].seconds_since(t0)
        out["ttff_buffer_s"] = first_chunk_frames / input_fps
        out["ttff_s"] = out["ttff_compute_s"] + out["ttff_buffer_s"]
        lat = [o.seconds_since(i) for (i, _), (o, _) in zip(self._inputs, self._outputs)]
        out.update(latency_stats(lat))
        per_stage = defaultdict(float)
        stage_frames = defaultdict(int)
        for name, a, b, frames in self._marks:
            per_stage[name] += b.seconds_since(a)
            stage_frames[name] += frames
        for name, secs in per_stage.items():
            out[f"{name}_s"] = secs
            frames = (frames_per_stage or {}).get(name, stage_frames[name])
            if frames and secs > 0:
                out[f"{name}_fps"] = frames / secs
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
