"""The units of a stream, defined once: video frames, latent frames, tokens, pixel ranges.

    video frames --(Wan VAE: 4 frames per latent frame, 8x8 pixels per latent cell)--> latent frames
    latent frames --(DiT patch 1x2x2)--> tokens: (H/16) * (W/16) per latent frame

A stream's first chunk is ``1 + 4k`` frames (frame 0 gets a latent frame of its own); later chunks ``4k``.
"""
from __future__ import annotations

import torch

FRAMES_PER_LATENT = 4      # Wan VAE temporal stride (after a stream's first frame)
PIXELS_PER_LATENT = 8      # Wan VAE spatial stride
PATCH = 2                  # DiT patch size in h and w
PIXEL_MULTIPLE = PIXELS_PER_LATENT * PATCH   # height and width must be multiples of this (16)


def check_resolution(height: int, width: int, what: str = "height and width") -> None:
    """Heights and widths that the VAE and the DiT patching divide exactly; otherwise a clear error."""
    if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0 \
            or height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
        def near(v):
            return max(PIXEL_MULTIPLE, round(v / PIXEL_MULTIPLE) * PIXEL_MULTIPLE) if isinstance(v, (int, float)) else "?"
        raise ValueError(f"{what} must be positive multiples of {PIXEL_MULTIPLE}, got {height}x{width}; "
                         f"nearest valid: {near(height)}x{near(width)}")


def tokens_per_latent_frame(height: int, width: int) -> int:
    """DiT tokens of one latent frame at a pixel resolution (480x832 -> 30*52 = 1560)."""
    check_resolution(height, width)
    return (height // PIXEL_MULTIPLE) * (width // PIXEL_MULTIPLE)


def chunk_frames(latent_frames: int, first: bool) -> int:
    """Video frames that make a chunk of ``latent_frames`` latent frames (the first chunk of a stream: 1 + 4k)."""
    return FRAMES_PER_LATENT * latent_frames + (1 if first else 0)


def latent_frames(video_frames: int, first: bool) -> int:
    """Latent frames of a chunk of ``video_frames`` frames (inverse of ``chunk_frames``)."""
    return (video_frames - 1) // FRAMES_PER_LATENT + 1 if first else video_frames // FRAMES_PER_LATENT


def to_unit(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels in [-1, 1] (the models' range) -> ``dtype`` in [0, 1] (files, metrics, screens, TAEHV's input)."""
    return (video.to(dtype) * 0.5 + 0.5).clamp(0, 1)
