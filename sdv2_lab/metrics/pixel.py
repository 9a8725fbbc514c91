"""Weight-free pixel metrics: flicker (frame-difference consistency) and SSIM / PSNR of output vs input.

SSIM and PSNR are torchmetrics' (data_range 1.0), through its functional API so that nothing accumulates
between calls; both are computed per frame and averaged over frames.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .base import NAN, check_frames, register_metric

FRAMES_PER_BATCH = 16   # bounds the memory of SSIM's Gaussian filtering on long clips


class Flicker:
    """Temporal flicker on the 0-255 scale, with Δx_t = x_{t+1} - x_t over all pixels and channels:

    * ``flicker`` = mean |Δout_t - Δin_t|: change between output frames that the input's own change does not
      explain (0 when every output frame-to-frame change equals the input's; lower is better);
    * ``output_frame_diff`` = mean |Δout_t|: raw frame-to-frame change of the output (motion + flicker).
    """

    name = "flicker"

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        if outputs.shape[0] < 2:
            return {"flicker": NAN, "output_frame_diff": NAN}
        delta_out = outputs.float().diff(dim=0) * 255
        delta_in = inputs.float().to(outputs.device).diff(dim=0) * 255
        return {"flicker": float((delta_out - delta_in).abs().mean()),
                "output_frame_diff": float(delta_out.abs().mean())}


class SSIM:
    """Mean over frames of SSIM(output_t, input_t) (Gaussian 11x11, sigma 1.5; 1 = identical)."""

    name = "ssim"

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        values = [structural_similarity_index_measure(out.float(), inp.float().to(out.device), data_range=1.0,
                                                      reduction="none")
                  for out, inp in zip(outputs.split(FRAMES_PER_BATCH), inputs.split(FRAMES_PER_BATCH))]
        return {self.name: float(torch.cat(values).mean())}


class PSNR:
    """Mean over frames of PSNR(output_t, input_t) in dB (data range 1.0; +inf for identical frames)."""

    name = "psnr"

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        values = peak_signal_noise_ratio(outputs.float(), inputs.float().to(outputs.device), data_range=1.0,
                                         dim=(1, 2, 3), reduction="none")
        return {self.name: float(values.mean())}


@register_metric("flicker")
def _build_flicker(cfg: Mapping, shared: dict) -> Flicker:
    return Flicker()


@register_metric("ssim")
def _build_ssim(cfg: Mapping, shared: dict) -> SSIM:
    return SSIM()


@register_metric("psnr")
def _build_psnr(cfg: Mapping, shared: dict) -> PSNR:
    return PSNR()
