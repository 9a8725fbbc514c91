"""Clips streamed through the engine as live input would arrive, and timed: ``sdv2 run``, the harness, the API's
whole-video call and the benchmark all go through here.

    video, stats = stream_clip(pipe, clip, "a watercolor street")               # one stream
    result = stream_clips(pipe, [clip_a, clip_b], ["prompt a", "prompt b"])     # streams=S: one DiT call per step

A chunk's frames are fed when the engine is ready for that chunk (its arrival: the start of its latency); up
to ``max_pending`` finished chunks per stream may still be on the GPU before the host waits for the oldest, so
the host runs ahead of the GPU (the stages overlap) without queueing a whole clip. Numbers follow the one
set of definitions (``timing.py``; docs/metrics.md).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .timing import StreamTimer


@dataclass
class ClipsResult:
    per_stream: list[dict]
    total: dict
    outputs: list[Optional[torch.Tensor]] = field(default_factory=list)   # [T, H, W, 3] in [0, 1] on the CPU


class _Source:
    """A stream's input: a whole clip (sliced into chunk-sized views) or an iterator of pieces."""

    def __init__(self, frames):
        self.clip = frames if isinstance(frames, torch.Tensor) else None
        self.pieces: Optional[Iterator] = None if self.clip is not None else iter(frames)
        self.pos, self.total, self.done = 0, 0, False

    def take(self, n: int) -> Optional[torch.Tensor]:
        """Up to the next ``n`` frames (whole-clip input) or the next piece (iterator input); None at the end."""
        if self.clip is not None:
            piece = self.clip[:, self.pos:self.pos + n]
            self.pos += piece.shape[1]
        else:
            piece = next(self.pieces, None)
        if piece is None or piece.shape[1] == 0:
            self.done = True
            return None
        self.total += piece.shape[1]
        return piece


class _HostCopy:
    """A finished chunk's frames on their way to the host: converted on the device (``uint8``: 4x fewer bytes),
    copied into pinned memory without blocking, ready when ``ready`` (a CUDA event) has passed."""

    def __init__(self, out, uint8: bool):
        from ..io.video import frames_to_uint8
        self.out, self.ready = out, None
        frames = out.frames
        if out.mark.event is not None:
            torch.cuda.current_stream().wait_event(out.mark.event)
        if uint8:
            frames = frames_to_uint8(frames)
        if frames.device.type != "cuda":
            self.frames = frames.cpu()
            return
        self.frames = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        self.frames.copy_(frames, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def done(self) -> bool:
        return self.ready is None or self.ready.query()

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.frames


@torch.no_grad()
def stream_clips(pipe, clips: Sequence, prompts: Sequence[str], *, seeds: Optional[Sequence[Optional[int]]] = None,
                 input_fps: float = 16.0, keep_output: bool = False, max_pending: int = 2,
                 on_frames: Optional[Callable[[int, torch.Tensor], None]] = None, progress=None,
                 host_frames: str = "float") -> ClipsResult:
    """clips: [3, T, H, W] in [-1, 1] each, or iterators of such pieces. Streams leave as their clips end
    (flushed, closed). ``on_frames(i, frames)`` gets stream i's finished frames on the CPU as they are ready:
    ``host_frames="float"`` [T, H, W, 3] float32 in [0, 1], ``"uint8"`` rounded to bytes on the device first
    (what a video writer takes). Frames come back to the host by asynchronous copies into pinned memory."""
    if host_frames not in ("float", "uint8"):
        raise ValueError(f"host_frames must be 'float' or 'uint8', got {host_frames!r}")
    driver = pipe.driver
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    if len(clips) > driver.cfg.max_streams:
        raise ValueError(f"{len(clips)} streams asked for, the engine serves {driver.cfg.max_streams} "
                         f"(set streams={len(clips)})")
    if pipe.stream is not None:  # the pipeline's own single stream would hold rows
        driver.close(pipe.stream)
        pipe.stream = None
    seeds = list(seeds) if seeds is not None else [None] * len(clips)
    streams = [driver.open(p, seed=sd) for p, sd in zip(prompts, seeds)]
    index = {s.id: i for i, s in enumerate(streams)}
    sources = [_Source(c) for c in clips]
    timers = [driver.subscribe(StreamTimer(driver.clock, s.id)) for s in streams]
    total = driver.subscribe(StreamTimer(driver.clock, None))
    first = [driver.frames_needed(s) for s in streams]
    outputs: dict = {s.id: [] for s in streams}
    pending: deque = deque()
    dropped = [0] * len(streams)

    def queue(outs) -> None:
        pending.extend(_HostCopy(o, host_frames == "uint8") for o in outs if o.frames.shape[0])

    def deliver(block_beyond: int) -> None:
        while pending and (len(pending) > block_beyond or pending[0].done()):
            copy = pending.popleft()
            frames = copy.wait()
            driver.verify(copy.out)  # bad numbers in this stream: an error naming its chunk and frame (input_guard)
            if on_frames is not None:
                on_frames(index[copy.out.stream], frames)
            if keep_output:   # kept in pageable memory: pinned memory is for transfers, not for whole videos
                outputs[copy.out.stream].append(frames.clone() if frames.is_pinned() else frames)
            if progress is not None:
                progress.update(frames.shape[0])

    try:
        live = list(zip(streams, sources))
        while live:
            for s, src in live:                      # each stream's next chunk arrives when the engine can take it
                while not driver.scheduler.ready(s) and not src.done:
                    piece = src.take(driver.frames_needed(s) - s.buffered)
                    if piece is not None:
                        driver.feed(s, piece)
            queue(driver.step([s for s, _ in live]))
            deliver(max_pending * len(live))
            for s, src in [x for x in live if x[1].done and not driver.scheduler.ready(x[0])]:
                if not s.started:
                    raise ValueError(f"the clip is shorter than the first chunk: {src.total} frame(s), "
                                     f"{driver.frames_needed(s)} needed")
                dropped[index[s.id]] = s.buffered
                queue(driver.flush(s))
                driver.close(s)
                live.remove((s, src))
        deliver(0)
    finally:
        for t in (*timers, total):
            driver.unsubscribe(t)
        for s in streams:
            driver.close(s)
    per_stream = []
    for t, f, s, src, d in zip(timers, first, streams, sources, dropped):
        n = len(s.steps) if driver.scheduler.rule.stream_batch else 1
        stats = t.summary(warmup_chunks=n, input_fps=input_fps, first_chunk_frames=f)
        stats.update(input_frames=src.total - d, dropped_trailing_frames=d)
        per_stream.append(stats)
    n = len(driver.cfg.step_list) if driver.scheduler.rule.stream_batch else 1
    summary = total.summary(warmup_chunks=n * len(streams), input_fps=input_fps, first_chunk_frames=max(first))
    stage_stats = getattr(driver.executor, "clip_stats", None)
    if stage_stats is not None:   # a pipe stage: every rank's stage times and the bubble (all ranks call it)
        extra = stage_stats()
        for stats in (*per_stream, summary):
            stats.update(extra)
    videos = [torch.cat(outputs[s.id]) if keep_output and outputs[s.id] else None for s in streams]
    return ClipsResult(per_stream, summary, videos)


def stream_clip(pipe, frames: torch.Tensor | Iterable[torch.Tensor], prompt: str, *, input_fps: float = 16.0,
                on_frames: Optional[Callable[[torch.Tensor], None]] = None, progress=None,
                keep_output: bool = True, seed: Optional[int] = None, max_pending: int = 2,
                host_frames: str = "float") -> tuple[Optional[torch.Tensor], dict]:
    """One clip ([3, T, H, W] in [-1, 1], or an iterator of pieces such as ``iter_video_frames``) through one
    stream. Returns (output frames [T', H, W, 3] in [0, 1] on the CPU or None, timing summary); ``on_frames``
    gets every finished piece on the CPU as it is ready."""
    r = stream_clips(pipe, [frames], [prompt], seeds=[seed], input_fps=input_fps, keep_output=keep_output,
                     max_pending=max_pending, progress=progress, host_frames=host_frames,
                     on_frames=None if on_frames is None else (lambda i, f: on_frames(f)))
    return r.outputs[0], r.per_stream[0]
