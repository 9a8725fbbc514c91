"""One streaming interface for every VAE, a registry of them, and their strict loaders.

    vae = build_vae(cfg.vae, wan_folder=..., dummy=False, device="cuda", dtype=torch.bfloat16)
    state = vae.new_state()                 # one per stream
    z = vae.encode(state, video)            # [B, 3, T, H, W] in [-1, 1] -> [B, F, 16, H/8, W/8]
    x = vae.decode(state, z)                # -> [B, T, 3, H, W] in [-1, 1]

A new VAE is a class registered with ``@register_vae(name)`` and a file in ``conf/vae/``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class StreamingVAE(Protocol):
    latent_channels: int
    weights_are_dummy: bool

    def new_state(self, batch_size: int = 1): ...
    def encode(self, state, video: torch.Tensor) -> torch.Tensor: ...
    def decode(self, state, latents: torch.Tensor) -> torch.Tensor: ...


_BUILDERS: dict[str, Callable] = {}


def register_vae(name: str):
    def wrap(fn):
        _BUILDERS[name] = fn
        return fn
    return wrap


def build_vae(cfg, *, wan_folder: Optional[str] = None, taehv_path: Optional[str] = None, dummy: bool = False,
              device="cpu", dtype=torch.float32) -> StreamingVAE:
    """``cfg``: a mapping with ``name`` (a registered VAE) and its options (``conf/vae/*.yaml``)."""
    opts = {k: v for k, v in dict(cfg).items() if k != "name"}
    name = cfg["name"]
    if name not in _BUILDERS:
        raise ValueError(f"unknown vae {name!r}; registered: {sorted(_BUILDERS)}")
    return _BUILDERS[name](opts, wan_folder=wan_folder, taehv_path=taehv_path, dummy=dummy, device=torch.device(device),
                           dtype=dtype)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
              if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"VAE checkpoint {source} does not fit {type(model).__name__}:"]
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped keys, e.g. " + "; ".join(f"{k}: file {a} vs model {b}"
                                                                            for k, a, b in shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise ValueError("\n  ".join(parts))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)


def materialize(make: Callable[[], nn.Module], sd: Optional[Mapping[str, torch.Tensor]], source: str, device,
                dtype, seed: int = 0) -> nn.Module:
    """Build on the meta device, then either assign checked weights (cast one tensor at a time) or random-init
    on the target device (dummy)."""
    with torch.device("meta"):
        model = make()
    if sd is None:
        model.to_empty(device=device)
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                m.weight.data.mul_(0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "gamma"):
                nn.init.ones_(m.gamma)
        model = model.to(dtype)
        model.weights_are_dummy = True
        log.warning("%s uses DUMMY (random) weights", type(model).__name__)
    else:
        check_state_dict(model, sd, source)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        model.weights_are_dummy = False
    return model.eval().requires_grad_(False)
