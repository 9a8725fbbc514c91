"""Deterministic synthetic clips with known motion: a textured square translating over a gradient.

Used by the tests and the embedded default (no video file needed). The ground-truth motion is returned so
that temporal metrics can be checked against a known answer.
"""
from __future__ import annotations

import math

import torch

from ..units import to_unit


def synthetic_clip(frames: int = 33, height: int = 64, width: int = 96, *, velocity=(1.5, 2.0), seed: int = 0,
                   square: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (video [3, T, H, W] in [-1, 1], motion [T, 2] = per-frame (dy, dx) in pixels of the square)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    background = torch.stack([xx / width, yy / height, 0.5 + 0.25 * torch.sin(xx / 7 + yy / 11)]) * 1.6 - 0.8
    side = max(4, int(square * min(height, width)))
    texture = torch.rand(3, side, side, generator=g) * 0.5 + torch.tensor([0.45, -0.2, -0.3])[:, None, None]
    stripes = torch.sin(torch.arange(side, dtype=torch.float32) * 2 * math.pi / 6)[None, None, :] * 0.2
    texture = (texture + stripes).clamp(-1, 1)
    video = background[:, None].repeat(1, frames, 1, 1)
    motion = torch.zeros(frames, 2)
    vy, vx = velocity
    for t in range(frames):
        y = int(round((height - side) / 2 + vy * t)) % max(1, height - side)
        x = int(round(4 + vx * t)) % max(1, width - side)
        video[:, t, y:y + side, x:x + side] = texture
        if t:
            motion[t] = torch.tensor([vy, vx])
    return video.clamp(-1, 1), motion


def write_synthetic_clip(path, frames: int = 33, height: int = 64, width: int = 96, fps: float = 16, **kw):
    from .video import export_video
    video, motion = synthetic_clip(frames, height, width, **kw)
    export_video(to_unit(video.permute(1, 2, 3, 0)), path, fps=fps)
    return motion


def main(argv=None) -> int:
    """``python -m sdv2_lab.io.synthetic out.mp4 [--frames 33 --height 64 --width 96 --fps 16 --seed 0]``"""
    import argparse
    p = argparse.ArgumentParser(prog="python -m sdv2_lab.io.synthetic",
                                description="Write a generated clip (a textured square moving over a gradient).")
    p.add_argument("path")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_synthetic_clip(a.path, a.frames, a.height, a.width, a.fps, seed=a.seed)
    print(f"wrote {a.path} ({a.frames} frames, {a.width}x{a.height}, {a.fps:g} fps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
