"""How faithfully a VAE reconstructs the input, against the Wan VAE: ``vae_fidelity`` (the reference's
``tools/eval_video_metrics.py`` idea, PSNR / SSIM of one video against another, applied to VAE round trips).

For each clip the metric streams the INPUT frames through the run's VAE (encode then decode, chunk by chunk, as
the pipeline does: 5 frames, then 4) and through the reference VAE (``reference``: the Wan VAE, ``conf/vae/wan``;
``wan_tiny`` for the tiny CPU demo), and reports

* ``vae_psnr_vs_wan`` / ``vae_ssim_vs_wan``: the run's VAE's reconstruction against the Wan VAE's (how close a
  plugin VAE comes to the decode it replaces; +inf / 1 for the Wan VAE itself);
* ``vae_psnr_vs_input`` / ``vae_ssim_vs_input``: the run's VAE's reconstruction against the input.

The round trip is taken in one latent space (``normalize_on_encode`` and ``denormalize_on_decode`` both on), so
that it measures the autoencoder, not the reference DiT's asymmetric latent convention (vae/wan_vae.py). The DiT
is not involved: the numbers are the VAE's alone, so a sweep ``sdv2 eval -m experiment=vae_quality
vae=wan,lightvae,lighttae,taehv,taehv_full`` gives the VAE table. With dummy weights the numbers are those of
random networks (a warning says so); quality needs the real files.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..units import FRAMES_PER_LATENT, chunk_frames
from .base import check_frames, device_of, register_metric, section

log = logging.getLogger(__name__)

FRAMES_PER_BATCH = 16


def _vae_config(spec, weights: Mapping) -> dict:
    """A conf/vae mapping from a name (``wan``; its ``${weights.*}`` resolved against ``weights``) or a mapping
    (the run's resolved ``vae`` config)."""
    if isinstance(spec, str):
        from omegaconf import OmegaConf
        from ..configs import CONF_DIR
        path = Path(CONF_DIR) / "vae" / f"{spec}.yaml"
        if not path.is_file():
            raise ValueError(f"metrics.vae_fidelity.reference={spec!r}: no {path}")
        root = OmegaConf.create({"weights": dict(weights), "vae": OmegaConf.load(path)})
        spec = OmegaConf.to_container(root, resolve=True)["vae"]
    return dict(spec)


class VAEFidelity:
    name = "vae_fidelity"

    def __init__(self, vae, reference, dummy: bool):
        self.vae, self.reference, self.dummy = vae, reference, dummy

    @torch.no_grad()
    def round_trip(self, vae, frames: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] in [0, 1] -> the VAE's streamed reconstruction of its first 1 + 4k frames, same layout."""
        p = next(vae.parameters())
        video = (frames.to(p.device, p.dtype) * 2 - 1).transpose(0, 1)[None]   # [1, 3, T, H, W] in [-1, 1]
        n = chunk_frames((video.shape[2] - 1) // FRAMES_PER_LATENT, first=True)
        first = chunk_frames(1, first=True)
        state, out = vae.new_state(), []
        for start, end in [(0, first)] + [(s, s + FRAMES_PER_LATENT) for s in range(first, n, FRAMES_PER_LATENT)]:
            if end <= n:
                out.append(vae.decode(state, vae.encode(state, video[:, :, start:end])))
        return torch.cat(out, 1)[0].float().add(1).div(2).clamp(0, 1).cpu()   # [T', 3, H, W]

    def __call__(self, inputs, outputs=None, prompt=None) -> dict[str, float]:
        check_frames(inputs)
        if inputs.shape[0] < 5:
            return {}
        ours = self.round_trip(self.vae, inputs)
        ref = self.round_trip(self.reference, inputs) if self.reference is not self.vae else ours
        frames = inputs[: ours.shape[0]].float().cpu()
        return {"vae_psnr_vs_wan": _psnr(ours, ref), "vae_ssim_vs_wan": _ssim(ours, ref),
                "vae_psnr_vs_input": _psnr(ours, frames), "vae_ssim_vs_input": _ssim(ours, frames)}


def _psnr(a, b) -> float:
    return float(peak_signal_noise_ratio(a, b, data_range=1.0, dim=(1, 2, 3), reduction="none").mean())


def _ssim(a, b) -> float:
    vals = [structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
            for x, y in zip(a.split(FRAMES_PER_BATCH), b.split(FRAMES_PER_BATCH))]
    return float(torch.cat(vals).mean())


def build_round_trip_vae(spec, weights: Mapping, device, dtype=torch.float32):
    """A VAE of ``spec`` (conf/vae mapping or name) with both latent flags on and no graphs (the metric's use)."""
    from ..vae import build_vae
    opts = _vae_config(spec, weights)
    opts.update(normalize_on_encode=True, denormalize_on_decode=True, accelerate="none")
    return build_vae(opts, wan_folder=weights.get("wan_folder"), taehv_path=weights.get("taehv"),
                     dummy=weights.get("kind", "dummy") == "dummy", device=device, dtype=dtype)


@register_metric("vae_fidelity")
def _build_vae_fidelity(cfg: Mapping, shared: dict) -> VAEFidelity:
    opts = section(cfg, "vae_fidelity")
    if not opts.get("vae"):
        raise ValueError("metrics.vae_fidelity.vae is not set: the VAE to measure (conf/metrics/vae_quality.yaml "
                         "sets it to the run's ${vae})")
    weights = dict(opts.get("weights") or {"kind": "dummy"})
    device = device_of(cfg)
    dtype = getattr(torch, str(opts.get("dtype", "float32")))
    vae = build_round_trip_vae(opts["vae"], weights, device, dtype)
    reference = opts.get("reference", "wan")
    same = {k: v for k, v in _vae_config(opts["vae"], weights).items() if k != "accelerate"} == \
        {k: v for k, v in _vae_config(reference, weights).items() if k != "accelerate"}
    ref = vae if same else build_round_trip_vae(reference, weights, device, dtype)
    dummy = weights.get("kind", "dummy") == "dummy"
    if dummy:
        log.warning("vae_fidelity: DUMMY weights: these PSNR / SSIM numbers are of random networks (plumbing only); "
                    "the VAE table needs weights=real and the files")
    return VAEFidelity(vae, ref, dummy)
