"""Optical flow for the temporal metrics: torchvision RAFT from a local state dict, or OpenCV DIS (no weights).

Conventions: frames [T, 3, H, W] in [0, 1]; a flow is [N, 2, H, W] in pixels, channel 0 = dx, channel 1 = dy,
and ``flow(a -> b)[p] = d`` means the content at p in a is at p + d in b (torchvision's and OpenCV's convention).
``backward_warp(image_a, flow(b -> a))`` therefore brings a onto b's pixel grid.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import existing_path, load_state_dict_file

RAFT_KEY = "metrics.warp.raft_weights"
RAFT_HOW = "torchvision's RAFT .pth, or metrics.warp.flow=dis (no weights) (docs/metrics.md)."
DIS_PRESETS = {"ultrafast": "DISOPTICAL_FLOW_PRESET_ULTRAFAST", "fast": "DISOPTICAL_FLOW_PRESET_FAST",
               "medium": "DISOPTICAL_FLOW_PRESET_MEDIUM"}


# ------------------------------------------------------------------------------------------ warping, masks

def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """out[p] = image[p + flow[p]], bilinear, zeros outside the frame (what cv2.remap does with its default
    constant border). image [N, C, H, W], flow [N, 2, H, W] in pixels."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    # align_corners=True: -1 and +1 are the centres of the first and last pixels, i.e. integer pixel coordinates
    grid_x = 2 * (xs + flow[:, 0]) / max(w - 1, 1) - 1
    grid_y = 2 * (ys + flow[:, 1]) / max(h - 1, 1) - 1
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(image.to(flow.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def consistent_flow_mask(flow: torch.Tensor, reverse_flow: torch.Tensor, alpha: float = 0.01,
                         beta: float = 0.5) -> torch.Tensor:
    """Forward-backward consistency (UnFlow, Meister et al. 2018) on ``flow``'s pixel grid: True where
    |w + w_r(p + w)|^2 < alpha (|w|^2 + |w_r(p + w)|^2) + beta, i.e. following the flow there and back
    returns (close to) the start, so the pixel is not occluded. flow, reverse_flow [N, 2, H, W] -> [N, H, W]."""
    reverse_at_target = backward_warp(reverse_flow, flow)
    round_trip = (flow + reverse_at_target).square().sum(1)
    magnitude = flow.square().sum(1) + reverse_at_target.square().sum(1)
    return round_trip < alpha * magnitude + beta


def streamv2v_occluded(forward: torch.Tensor, backward: torch.Tensor, alpha: float = 0.01,
                       beta: float = 0.5) -> torch.Tensor:
    """The occlusion mask of StreamV2V's tools/warp_error.py (used for the paper's table): occluded where
    |f + b(p + f)| > alpha (|f| + |b|) + beta with plain (not squared) norms and |b| taken at p. It is computed on
    frame t's grid but the script applies it to frame t+1's pixels. [N, H, W], True = occluded."""
    round_trip = torch.linalg.vector_norm(forward + backward_warp(backward, forward), dim=1)
    magnitude = torch.linalg.vector_norm(forward, dim=1) + torch.linalg.vector_norm(backward, dim=1)
    return round_trip > alpha * magnitude + beta


# ----------------------------------------------------------------------------------------------- estimators

class DISFlow:
    """OpenCV DIS optical flow on grayscale uint8 frames (CPU, no weights)."""

    name = "dis"

    def __init__(self, preset: str = "medium"):
        if preset not in DIS_PRESETS:
            raise ValueError(f"metrics.warp.dis_preset must be one of {sorted(DIS_PRESETS)}, got {preset!r}")
        self.preset = preset

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """flow(first -> second) for frame batches [N, 3, H, W] in [0, 1] -> [N, 2, H, W] float32 (CPU)."""
        import cv2
        dis = cv2.DISOpticalFlow_create(getattr(cv2, DIS_PRESETS[self.preset]))  # fresh: no state between calls
        gray_first, gray_second = _gray_uint8(first), _gray_uint8(second)
        flows = [dis.calc(a, b, None) for a, b in zip(gray_first, gray_second)]   # [H, W, 2] each (dx, dy)
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous()


def _gray_uint8(frames: torch.Tensor) -> np.ndarray:
    # ITU-R BT.601 luma, as cv2.COLOR_RGB2GRAY
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32)[:, None, None]
    gray = (frames.detach().float().cpu().clamp(0, 1) * weights).sum(1) * 255
    return gray.round().to(torch.uint8).numpy()


class RAFTFlow:
    """torchvision RAFT (large or small) with weights from a local state dict (weights=None: no download)."""

    name = "raft"
    MIN_SIDE = 128   # RAFT's correlation pyramid needs feature maps of >= 16 px at 1/8 resolution

    def __init__(self, weights: Optional[str], arch: str = "auto", iters: int = 12,
                 device: torch.device | str = "cpu", batch_size: int = 8):
        from torchvision.models.optical_flow import raft_large, raft_small
        path = existing_path(weights, config_key=RAFT_KEY, what="RAFT weights", how=RAFT_HOW,
                             example="raft_large_C_T_SKHT_V2-ff5fadd5.pth")
        state = load_state_dict_file(path)
        builders = {"large": raft_large, "small": raft_small}
        if arch not in ("auto", *builders):
            raise ValueError(f"metrics.warp.raft_arch must be auto, large or small, got {arch!r}")
        errors = {}
        for name in ([arch] if arch != "auto" else ["large", "small"]):
            model = builders[name](weights=None, progress=False)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                errors[name] = str(err).splitlines()[0] + " ..."
                continue
            self.arch, self.model = name, model.to(device).eval()
            break
        else:
            raise ValueError(f"{path} is not a torchvision RAFT state dict for {sorted(errors)}: {errors}")
        self.iters, self.device, self.batch_size = int(iters), torch.device(device), int(batch_size)

    @torch.no_grad()
    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """flow(first -> second) for frame batches [N, 3, H, W] in [0, 1] -> [N, 2, H, W] float32 (CPU)."""
        h, w = first.shape[-2:]
        # pad (replicating edges) to a multiple of 8 and at least MIN_SIDE, then crop the flow back
        pad_h = max(self.MIN_SIDE, -(-h // 8) * 8) - h
        pad_w = max(self.MIN_SIDE, -(-w // 8) * 8) - w
        flows = []
        for a, b in zip(first.split(self.batch_size), second.split(self.batch_size)):
            a, b = (F.pad(x.to(self.device).float() * 2 - 1, (0, pad_w, 0, pad_h), mode="replicate") for x in (a, b))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                flows.append(self.model(a, b, num_flow_updates=self.iters)[-1][..., :h, :w].float().cpu())
        return torch.cat(flows)


def build_flow(flow: str = "auto", raft_weights: Optional[str] = None, *, raft_arch: str = "auto",
               raft_iters: int = 12, dis_preset: str = "medium", device: torch.device | str = "cpu",
               batch_size: int = 8):
    """``auto``: RAFT when raft_weights is set, else DIS. ``raft`` without weights raises MetricUnavailable."""
    if flow == "auto":
        flow = "raft" if raft_weights else "dis"
    if flow == "dis":
        return DISFlow(dis_preset)
    if flow == "raft":
        return RAFTFlow(raft_weights, arch=raft_arch, iters=raft_iters, device=device, batch_size=batch_size)
    raise ValueError(f"metrics.warp.flow must be auto, raft or dis, got {flow!r}")


__all__ = ["DISFlow", "RAFTFlow", "build_flow", "backward_warp", "consistent_flow_mask", "streamv2v_occluded"]
