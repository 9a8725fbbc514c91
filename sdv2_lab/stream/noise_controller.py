"""The motion-aware noise controller (reference.md §2.5), computed on the device with no host sync.

For each chunk after the first: ``d_j = sqrt(mean((f_j - f_{j-1})^2))`` over the chunk's frames (the first
compared with the previous chunk's last frame), ``m = clamp(max_j d_j / motion_scale, 0, 1)``,
``s = ema * (s0 - span * m) + (1 - ema) * s_prev`` and the model is told ``int(1000 s) - step_offset``.
More motion means less noise. The reference does the motion reduction in bf16, reads it with ``.item()``
and keeps ``s`` as a Python float; here ``s`` stays a float64 device scalar and the bf16 reduction is done
with the same ops, so the values are identical and nothing waits for the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseControllerConfig:
    noise_scale: float = 0.8     # s0: the initial and target noise level
    fixed: bool = False          # keep s = s0 and t = int(1000 s0) - step_offset for every chunk
    motion_scale: float = 0.2    # RMS frame difference that counts as full motion
    span: float = 0.1            # full motion lowers the target by this much
    ema: float = 0.9             # weight of the new target against the previous scale
    step_offset: int = 100       # the timestep given to the model is 1000 s - offset (§2.5: reproduce)


class MotionNoiseController:
    def __init__(self, cfg: NoiseControllerConfig, device):
        self.cfg = cfg
        self.s0 = torch.tensor(cfg.noise_scale, dtype=torch.float64, device=device)
        self.scale = self.s0.clone()  # s of the last chunk

    def timestep(self, scale: torch.Tensor) -> torch.Tensor:
        return (1000 * scale).trunc().long() - self.cfg.step_offset  # Python int() truncates toward zero

    def motion(self, frames: torch.Tensor, previous_last: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, T, H, W] (bf16 in [-1, 1]), previous_last [B, 3, 1, H, W] -> motion in [0, 1] (bf16)."""
        seq = torch.cat([previous_last, frames], dim=2)
        d = (seq[:, :, 1:] - seq[:, :, :-1]) ** 2
        m = (torch.sqrt(d.mean(dim=(0, 1, 3, 4))).max() / self.cfg.motion_scale).clamp(0, 1)
        return m.nan_to_num(nan=1.0)   # frames with NaN: full motion, never a NaN noise level (nor a garbage step)

    def next_scale(self, frames: torch.Tensor, previous_last: torch.Tensor, s_prev, s0=None):
        """The controller as a pure function of explicit previous and initial scales (floats or tensors)."""
        s0 = self.s0 if s0 is None else torch.as_tensor(s0, dtype=torch.float64, device=self.s0.device)
        if self.cfg.fixed:
            return s0, self.timestep(s0)
        s_prev = torch.as_tensor(s_prev, dtype=torch.float64, device=self.s0.device)
        m = self.motion(frames, previous_last).double()
        s = (s0 - self.cfg.span * m) * self.cfg.ema + s_prev * (1 - self.cfg.ema)
        return s, self.timestep(s)

    def update(self, frames: torch.Tensor, previous_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (s as a float64 device scalar, timestep as an int64 device scalar) and remembers s."""
        self.scale, step = self.next_scale(frames, previous_last, self.scale)
        return self.scale, step


def mix_noise(latents: torch.Tensor, noise: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``noise * s + latents * (1 - s)`` rounded exactly as the reference's bf16-tensor-times-Python-float ops:
    each product computed in fp32 and rounded to the tensor dtype, then the sum likewise."""
    dt = latents.dtype
    a = (noise.float() * scale.float()).to(dt)
    b = (latents.float() * (1 - scale).float()).to(dt)
    return (a.float() + b.float()).to(dt)
