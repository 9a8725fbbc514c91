"""LPIPS between input and output frames, through the ``lpips`` package, fully offline.

The lpips wheel ships the calibrated linear heads (``lpips/weights/v0.1/{alex,vgg,squeeze}.pth``) but gets its
backbone from torchvision's ImageNet download. We build it with a random backbone (``pnet_rand=True``, no
download) and then load the torchvision-format backbone state dict from a local file. lpips keeps torchvision's
layer indices inside its slices (``net.slice2.3.weight`` is torchvision's ``features.3.weight``), so the mapping
is by index.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Optional

import torch

from .base import (MetricUnavailable, check_frames, device_of, existing_path, load_state_dict_file, register_metric,
                   section)

LPIPS_KEY = "metrics.lpips.backbone_weights"
# torchvision's ImageNet checkpoint for each lpips backbone (what torchvision would download)
TORCHVISION_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
_SLICE_PARAM = re.compile(r"^slice\d+\.(\d+)\.(.+)$")


def _how_to_get(net: str) -> str:
    return f"It is torchvision's ImageNet {net} file (docs/metrics.md)."


def load_lpips_backbone(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy torchvision ``features.{i}.*`` tensors into an ``lpips.LPIPS`` model's ``net.slice{k}.{i}.*``."""
    targets = model.net.state_dict()
    mapped, missing = {}, []
    for name, tensor in targets.items():
        index, param = _SLICE_PARAM.match(name).groups()
        key = f"features.{index}.{param}"
        if key not in state:
            missing.append(key)
        elif state[key].shape != tensor.shape:
            missing.append(f"{key} (shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)})")
        else:
            mapped[name] = state[key]
    if missing:
        raise ValueError(f"{source} is not a torchvision {model.pnet_type} backbone: missing or mismatched "
                         f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
    model.net.load_state_dict(mapped, strict=True)


class LPIPSDistance:
    """Mean LPIPS(input_t, output_t) over frames (lower is closer). Frames [0, 1] are scaled to [-1, 1]."""

    name = "lpips"

    def __init__(self, backbone_weights: Optional[str], net: str = "alex", device: torch.device | str = "cpu",
                 batch_size: int = 8):
        if net not in TORCHVISION_BACKBONE_FILES:
            raise ValueError(f"metrics.lpips.net must be one of {sorted(TORCHVISION_BACKBONE_FILES)}, got {net!r}")
        path = existing_path(backbone_weights, config_key=LPIPS_KEY,
                             what=f"LPIPS-{net} backbone weights",
                             how=_how_to_get(net), example=TORCHVISION_BACKBONE_FILES[net])
        try:  # after the weights check: with no weights configured the package is not needed at all
            import lpips
        except ImportError as exc:
            raise MetricUnavailable(f"the lpips package is not installed ({exc}); install the metrics extra: "
                                    f"pip install 'sdv2_lab[metrics]' torch==<your torch> (keeps torch pinned)",
                                    config_key=LPIPS_KEY) from exc
        with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        load_lpips_backbone(model, load_state_dict_file(path), source=path)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-frame LPIPS [T] between two [T, 3, H, W] videos in [0, 1]."""
        values = []
        for x, y in zip(a.split(self.batch_size), b.split(self.batch_size)):
            x, y = x.to(self.device).float() * 2 - 1, y.to(self.device).float() * 2 - 1
            values.append(self.model(x, y).flatten().cpu())
        return torch.cat(values)

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        return {self.name: float(self.distances(inputs, outputs).mean())}


@register_metric("lpips")
def _build_lpips(cfg: Mapping, shared: dict) -> LPIPSDistance:
    lp = section(cfg, "lpips")
    return LPIPSDistance(lp.get("backbone_weights"), net=lp.get("net") or "alex", device=device_of(cfg),
                         batch_size=lp.get("batch_size", 8))
