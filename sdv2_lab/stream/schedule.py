"""The flow-matching noise schedule of StreamDiffusionV2 (reference.md §2.3).

Grid: ``sigma_b = linspace(1, 0, 1001)[:-1]``, shifted ``sigma = s*sigma_b / (1 + (s-1)*sigma_b)`` with
s = 8, ``timesteps = 1000*sigma``. A timestep t maps to the sigma of the nearest grid timestep, for both
noising (``add_noise``) and the velocity -> x0 conversion. The grid is built in float32 exactly as the
reference builds it, so looked-up sigmas are bit-identical.

The sampler's steps, used by every executor and pipe stage alike: ``FlowMatchSchedule.step`` (one denoising
step of a chunk: velocity -> x0, re-noised to the next timestep) and ``stream_batch_step`` (the stream batch: every
slot one step, the leaving slot out, the rest shifted one slot on).
"""
from __future__ import annotations

from typing import Optional

import torch


class FlowMatchSchedule:
    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000):
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.shift = shift
        self.sigmas = shift * base / (1 + (shift - 1) * base)  # float32, descending
        self.timesteps = self.sigmas * num_train_timesteps
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.sigmas.to(device), self.timesteps.to(device))
        return self._device_cache[device]

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        """Self-Forcing's ``warp_denoising_step``: a step t (an integer in (0, 1000]) read as a grid index,
        t -> timesteps[1000 - t] (float32, same shape, on t's device; no host sync)."""
        _, timesteps = self._on(t.device)
        return timesteps[(1000 - t.long()).clamp(0, timesteps.numel() - 1)]

    def sigma(self, t: torch.Tensor, lookup_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma for each timestep (any shape, any numeric dtype) -> float32, same shape. No host sync.

        The nearest-grid search runs in ``lookup_dtype``: float32 for noising, float64 for the x0
        conversion, as the reference does (it only matters at exact ties)."""
        sigmas, timesteps = self._on(t.device)
        idx = (timesteps.to(lookup_dtype)[None, :] - t.reshape(-1, 1).to(lookup_dtype)).abs().argmin(dim=1)
        return sigmas[idx].reshape(t.shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(1 - sigma) x0 + sigma noise, t broadcast over the leading dims of x0; result in noise's dtype."""
        s = self.sigma(t).reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
        return ((1 - s) * x0 + s * noise).to(noise.dtype)

    def velocity_to_x0(self, velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma_t * v (the network predicts v = noise - x0). Computed in float64 as the reference."""
        s = self.sigma(t, torch.float64).double().reshape(*t.shape, *([1] * (x_t.dim() - t.dim())))
        return (x_t.double() - s * velocity.double()).to(velocity.dtype)

    def step(self, velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
             t_next: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One denoising step of chunks [B, F, ...] at timesteps ``t`` [B]: (x0, x0 re-noised to ``t_next`` [B]
        with ``noise``, or None without a next timestep)."""
        f = x_t.shape[1]
        x0 = self.velocity_to_x0(velocity, x_t, t[:, None].expand(-1, f))
        renoised = None if t_next is None else self.add_noise(x0, noise, t_next[:, None].expand(-1, f))
        return x0, renoised


def next_slot_timesteps(t: torch.Tensor, slots: int) -> torch.Tensor:
    """Stream-batch timesteps [S * slots] -> each slot's next one: slot i gets t_{i+1} (the last slot's leaves
    with its x0, so its value is unused)."""
    return t.unflatten(0, (-1, slots)).roll(-1, dims=1).flatten()


def stream_batch_step(schedule: FlowMatchSchedule, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the stream batch over rows [S * slots, F, ...] (slot i of every stream at its own timestep):
    returns each stream's leaving x0 [S, F, ...] (its last slot) and the in-flight latents for the next call [S * slots, ...]:
    slot i + 1 = slot i's x0 re-noised to t_{i+1}; slot 0 is overwritten by the stream's next chunk."""
    x0, renoised = schedule.step(velocity, x, t, noise, next_slot_timesteps(t, slots))
    in_flight = renoised.unflatten(0, (-1, slots)).roll(1, dims=1).flatten(0, 1)
    return x0.unflatten(0, (-1, slots))[:, -1], in_flight
