"""The flow-matching noise schedule of StreamDiffusionV2 (reference.md §2.3).

Grid: ``sigma_b = linspace(1, 0, 1001)[:-1]``, shifted ``sigma = s*sigma_b / (1 + (s-1)*sigma_b)`` with
s = 8, ``timesteps = 1000*sigma``. A timestep t maps to the sigma of the nearest grid timestep, for both
noising (``add_noise``) and the velocity -> x0 conversion. The grid is built in float32 exactly as the
reference builds it, so looked-up sigmas are bit-identical.
"""
from __future__ import annotations

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
