"""Warp error (temporal consistency), as the paper computes it (StreamV2V's tools/warp_error.py).

For each pair (t, t+1):
1. optical flow on the INPUT frames, t -> t+1 and t+1 -> t (the source video's motion, so a restyled output
   cannot confuse the flow);
2. a forward-backward occlusion check (alpha = 0.01, beta = 0.5, following UnFlow);
3. the OUTPUT frame t is warped onto frame t+1 with the backward flow (bilinear ``grid_sample``, zeros outside);
4. the mean absolute difference to output frame t+1 over the non-occluded pixels (and the 3 channels), on the
   0-255 scale.
The clip's value is the mean over pairs (pairs with no valid pixel are skipped). Lower is better.

Two variants of step 4:
* ``uint8`` (paper-compatible): frames are uint8 and the difference is taken in uint8 arithmetic, as the
  script's ``np.abs(a - b)`` on two uint8 arrays does, so it wraps around modulo 256: a pixel 1 level darker
  than its warped predecessor counts 1, one level brighter counts 255. On real clips, where pixels brighten
  about as often as they darken, this lifts the value far above a true L1; it is the likely reason for the
  scale of the paper's values (73-117). Compare with the paper's table only through this variant. The warped
  frame is rounded to uint8, as cv2.remap does.
* ``float``: the true mean |warped - next| on 0-255 floats (no quantisation, no wrap-around).

Occlusion check (``occlusion``):
* ``unflow`` (default, correct): pixels of frame t+1 whose backward flow passes the UnFlow test
  |b + f(p + b)|^2 < alpha (|b|^2 + |f(p + b)|^2) + beta.
* ``streamv2v``: the script's mask, unsquared norms and computed on frame t's grid, then applied to frame t+1
  (an inconsistency in the script, kept for exact comparisons with the paper). It lets through the pixels of
  frame t+1 that entered across the border (warped from outside frame t, i.e. zeros), so under motion it reads
  higher than ``unflow``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import NAN, check_frames, device_of, register_metric, section, to_uint8
from .flow import backward_warp, build_flow, consistent_flow_mask, streamv2v_occluded

VARIANTS = ("uint8", "float")
OCCLUSION_CHECKS = ("unflow", "streamv2v")


def valid_pixels(forward: torch.Tensor, backward: torch.Tensor, occlusion: str = "unflow", alpha: float = 0.01,
                 beta: float = 0.5) -> torch.Tensor:
    """[N, H, W] bool, True where frame t+1's pixel counts (not occluded)."""
    if occlusion == "unflow":
        return consistent_flow_mask(backward, forward, alpha, beta)
    if occlusion == "streamv2v":
        return ~streamv2v_occluded(forward, backward, alpha, beta)
    raise ValueError(f"metrics.warp.occlusion must be one of {OCCLUSION_CHECKS}, got {occlusion!r}")


def pair_errors(outputs: torch.Tensor, backward: torch.Tensor, valid: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-pair masked mean absolute error on 0-255 [T-1] (NaN for a pair without valid pixels).

    outputs [T, 3, H, W] in [0, 1]; backward [T-1, 2, H, W] = flow(t+1 -> t); valid [T-1, H, W]."""
    previous, following = outputs[:-1], outputs[1:]
    if variant == "float":
        warped = backward_warp(previous.float() * 255, backward)
        diff = (warped - following.float() * 255).abs()
    elif variant == "uint8":
        warped = backward_warp(to_uint8(previous).float(), backward).round().clamp(0, 255)
        # uint8 - uint8 wraps modulo 256 (numpy and torch alike); np.abs of a uint8 is the identity
        diff = (warped.to(torch.int16) - to_uint8(following).to(torch.int16)).remainder(256).float()
    else:
        raise ValueError(f"warp error variant must be one of {VARIANTS}, got {variant!r}")
    mask = valid[:, None].to(diff.dtype)
    count = mask.sum((1, 2, 3)) * diff.shape[1]
    total = (diff * mask).sum((1, 2, 3))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, NAN))


def warp_error(outputs: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, *,
               variants: Sequence[str] = VARIANTS, occlusion: str = "unflow", alpha: float = 0.01, beta: float = 0.5,
               chunk: int = 8) -> dict[str, float]:
    """Warp error of ``outputs`` [T, 3, H, W] under the INPUT flows forward [T-1, 2, H, W] (t -> t+1) and
    backward (t+1 -> t). Returns ``warp_error_<variant>`` per variant and ``warp_error_valid_frac`` (the share
    of pixels that passed the occlusion check)."""
    pairs = outputs.shape[0] - 1
    if forward.shape[0] != pairs or backward.shape[0] != pairs:
        raise ValueError(f"need {pairs} forward and backward flows for {pairs + 1} frames, "
                         f"got {forward.shape[0]} and {backward.shape[0]}")
    per_pair = {variant: [] for variant in variants}
    valid_frac = []
    for start in range(0, pairs, chunk):   # bounded memory on long, large clips
        stop = min(start + chunk, pairs)
        fwd, bwd = forward[start:stop].float(), backward[start:stop].float()
        frames = outputs[start:stop + 1].to(bwd.device)
        valid = valid_pixels(fwd, bwd, occlusion, alpha, beta)
        valid_frac.append(valid.float().mean((1, 2)))
        for variant in variants:
            per_pair[variant].append(pair_errors(frames, bwd, valid, variant))
    result = {}
    for variant, errors in per_pair.items():
        errors = torch.cat(errors)
        errors = errors[~errors.isnan()]
        result[f"warp_error_{variant}"] = float(errors.mean()) if errors.numel() else NAN
    result["warp_error_valid_frac"] = float(torch.cat(valid_frac).mean())
    return result


class WarpError:
    """Warp error of the output under the input's optical flow; keys warp_error_{uint8,float}, *_valid_frac."""

    name = "warp_error"

    def __init__(self, flow, variants: Sequence[str] = VARIANTS, occlusion: str = "unflow", alpha: float = 0.01,
                 beta: float = 0.5):
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"metrics.warp.variants must be a non-empty subset of {list(VARIANTS)}, got {variants}")
        if occlusion not in OCCLUSION_CHECKS:
            raise ValueError(f"metrics.warp.occlusion must be one of {OCCLUSION_CHECKS}, got {occlusion!r}")
        self.flow, self.variants = flow, tuple(variants)
        self.occlusion, self.alpha, self.beta = occlusion, float(alpha), float(beta)

    def input_flows(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow t -> t+1, flow t+1 -> t) of the input frames, [T-1, 2, H, W] each."""
        return self.flow(inputs[:-1], inputs[1:]), self.flow(inputs[1:], inputs[:-1])

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        if inputs.shape[0] < 2:
            return {**{f"warp_error_{v}": NAN for v in self.variants}, "warp_error_valid_frac": NAN}
        forward, backward = self.input_flows(inputs)
        return warp_error(outputs.detach().cpu(), forward, backward, variants=self.variants,
                          occlusion=self.occlusion, alpha=self.alpha, beta=self.beta)


@register_metric("warp_error")
def _build_warp_error(cfg: Mapping, shared: dict) -> WarpError:
    warp = section(cfg, "warp")
    flow = build_flow(warp.get("flow") or "auto", warp.get("raft_weights"), raft_arch=warp.get("raft_arch") or "auto",
                      raft_iters=warp.get("raft_iters", 12), dis_preset=warp.get("dis_preset") or "medium",
                      device=device_of(cfg), batch_size=warp.get("raft_batch_size", 8))
    return WarpError(flow, variants=warp.get("variants") or VARIANTS, occlusion=warp.get("occlusion") or "unflow",
                     alpha=warp.get("alpha", 0.01), beta=warp.get("beta", 0.5))

