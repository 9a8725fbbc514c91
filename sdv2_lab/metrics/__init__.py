"""Video-quality metrics for the evaluation harness.

    metrics, unavailable = build_metrics(cfg.metrics)      # conf/metrics/*.yaml
    for metric in metrics:
        scores.update(metric(input_frames, output_frames, prompt))   # frames: float [T, 3, H, W] in [0, 1]

Registered metrics: clip_consistency, clip_score (local CLIP folder), lpips (local torchvision backbone),
warp_error (RAFT from a local file, or OpenCV DIS with no weights), flicker, ssim, psnr, vae_fidelity (the
run's VAE's round trip of the input against the Wan VAE's: conf/metrics/vae_quality.yaml). Metrics whose weights
are not configured are left out and reported in ``unavailable`` ({name: reason}); nothing is ever downloaded.
"""
from .base import (Metric, MetricUnavailable, available_metrics, build_metrics, register_metric)
from .clip import ClipConsistency, ClipEncoder, ClipPromptScore, load_clip_encoder
from .flow import DISFlow, RAFTFlow, backward_warp, build_flow, consistent_flow_mask
from .perceptual import LPIPSDistance, load_lpips_backbone
from .pixel import PSNR, SSIM, Flicker
from .vae_fidelity import VAEFidelity
from .warp_error import WarpError, warp_error

__all__ = [
    "Metric", "MetricUnavailable", "available_metrics", "build_metrics", "register_metric",
    "ClipConsistency", "ClipEncoder", "ClipPromptScore", "load_clip_encoder",
    "DISFlow", "RAFTFlow", "backward_warp", "build_flow", "consistent_flow_mask",
    "LPIPSDistance", "load_lpips_backbone",
    "Flicker", "PSNR", "SSIM", "VAEFidelity",
    "WarpError", "warp_error",
]
