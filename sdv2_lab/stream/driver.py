"""Stream one clip through a pipeline exactly as live input would arrive, chunk by chunk, and time it.

Shared by ``sdv2 run`` and the evaluation loop, so both measure the same thing the same way.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .timing import StageTimer


def stream_clip(pipe, frames: torch.Tensor | Iterable[torch.Tensor], prompt: str, *, input_fps: float = 16.0,
                on_frames: Optional[Callable[[torch.Tensor], None]] = None, progress=None,
                keep_output: bool = True) -> tuple[Optional[torch.Tensor], dict]:
    """frames: [3, T, H, W] in [-1, 1], or an iterator of such pieces (e.g. ``iter_video_frames``).

    Returns (output frames [T', H, W, 3] in [0, 1] on the CPU or None, timing summary). ``on_frames`` gets
    every finished piece as it appears (for writing video incrementally)."""
    timer = StageTimer(pipe.device)
    previous_hook, pipe.stage = pipe.stage, timer.stage
    try:
        stats, outputs = _stream(pipe, timer, frames, prompt, input_fps, on_frames, progress, keep_output)
    finally:
        pipe.stage = previous_hook  # timing only inside this function, also after an error
    video = torch.cat(outputs) if keep_output and outputs else None
    return video, stats


def _stream(pipe, timer, frames, prompt, input_fps, on_frames, progress, keep_output):
    """The chunk loop of ``stream_clip`` with ``timer`` installed: (timing summary, output pieces)."""
    pipe.start(prompt)
    # A whole clip is one piece: chunks are sliced off it as views (no per-frame concatenation); an iterator's
    # pieces are buffered until a chunk is complete, as frames arriving live would be.
    pieces = [frames] if isinstance(frames, torch.Tensor) else frames
    buffer = None
    outputs = []
    in_frames = 0
    out_frames = [0]
    first_chunk = None

    def emit(out):
        timer.chunk_out(out.shape[0])
        out_frames[0] += out.shape[0]
        if out.shape[0]:
            if on_frames is not None:
                on_frames(out)
            if keep_output:
                outputs.append(out.cpu())
            if progress is not None:
                progress.update(out.shape[0])

    for piece in pieces:
        buffer = piece if buffer is None else torch.cat([buffer, piece], dim=1)
        while buffer is not None and buffer.shape[1] >= pipe.frames_needed():
            k = pipe.frames_needed()
            chunk, buffer = buffer[:, :k], (buffer[:, k:] if buffer.shape[1] > k else None)
            first_chunk = first_chunk or k
            timer.chunk_in(k)
            in_frames += k
            emit(pipe.push(chunk))
    if first_chunk is None:
        raise ValueError(f"the clip is shorter than the first chunk ({pipe.frames_needed()} frames)")
    emit(pipe.flush())
    dropped = 0 if buffer is None else buffer.shape[1]
    n = pipe.num_steps if pipe.strategy.batched else 1
    stats = timer.summary(warmup_chunks=1 + (n - 1), input_fps=input_fps, first_chunk_frames=first_chunk,
                          frames_per_stage={"encode": in_frames, "decode": out_frames[0], "dit": out_frames[0]})
    stats.update(input_frames=in_frames, dropped_trailing_frames=dropped)
    return stats, outputs
