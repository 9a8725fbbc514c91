"""Reading VAE checkpoints in the official formats, strict checks, key converters and dummy init.

Formats:
  * ``Wan2.1_VAE.pth``: a torch pickle of the Wan module names (read with ``weights_only=True``, mmap);
  * a diffusers ``AutoencoderKLWan`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
    (or a pipeline root holding ``vae/``); keys converted to the Wan names by ``diffusers_to_wan``;
  * ``taew2_1.pth``: the TAEHV state dict (``encoder.<i>.*`` / ``decoder.<i>.*``);
  * the LightX2V plugin files (``lightx2v/Autoencoders``): ``lightvaew2_1.pth`` / ``.safetensors`` is the Wan VAE
    at base width 24 under the same key names; ``lighttaew2_1.pth`` / ``.safetensors`` is TAEHV trained on raw
    Wan latents, under TAEHV's key names.

A Wan VAE's architecture comes from its file (the base width from ``encoder.conv1.weight``, a diffusers folder's
``config.json``), as the DiT's comes from ``config.json``: the config's ``dim`` is the width of dummy weights.

Models are built on the meta device and receive the checked tensors with ``load_state_dict(assign=True)``,
each tensor cast once to the target device/dtype: no full fp32 model is ever materialised.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

WAN_VAE_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def existing_file(path: str | Path) -> Path:
    """``path``, or the same file in the other container (``.pth`` <-> ``.safetensors``) when only that exists
    (the plugin VAEs are published in both)."""
    path = Path(path).expanduser()
    if not path.exists():
        for a, b in ((".pth", ".safetensors"), (".safetensors", ".pth")):
            if path.suffix == a and path.with_suffix(b).is_file():
                log.info("%s not found; reading %s", path, path.with_suffix(b).name)
                return path.with_suffix(b)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a ``.pth``/``.pt``/``.bin`` (torch pickle, weights only) or
    ``.safetensors`` file. A ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = existing_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(obj)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` and the first few missing, unexpected and mis-shaped keys
    (with the shapes the model expects)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, tuple(sd[k].shape), expected[k]) for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"checkpoint {source} does not fit {type(model).__name__} "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys)"]
    if missing:
        lines.append("missing: " + ", ".join(f"{k} {expected[k]}" for k in missing[:5]))
    if unexpected:
        lines.append("unexpected: " + ", ".join(f"{k} {tuple(sd[k].shape)}" for k in unexpected[:5]))
    if wrong:
        lines.append("mis-shaped: " + ", ".join(f"{k}: file {a}, expected {b}" for k, a, b in wrong[:5]))
    raise ValueError("\n  ".join(lines))


def dummy_init_(model: nn.Module, seed: int = 0) -> None:
    """Random weights that keep activations O(1) through deep conv stacks (for throughput work)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            w = torch.randn(p.shape, generator=gen) * (0.5 / fan_in ** 0.5)
        elif name.endswith("gamma"):
            w = torch.ones(p.shape)
        else:
            w = torch.zeros(p.shape)
        with torch.no_grad():
            p.copy_(w.to(p.dtype))


def materialize(make: Callable[[], nn.Module], sd: Optional[Mapping[str, torch.Tensor]], source: str,
                device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Build ``make()`` on the meta device, then assign the checked ``sd`` (cast per tensor) or, with
    ``sd=None``, random weights made directly on ``device`` (flagged ``weights_are_dummy``)."""
    with torch.device("meta"):
        model = make()
    if sd is None:
        model.to_empty(device=device)
        model.to(dtype)
        dummy_init_(model, seed)
        model.weights_are_dummy = True
        log.warning("%s uses DUMMY (random) weights: outputs are noise", type(model).__name__)
    else:
        check_state_dict(model, sd, source)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        model.weights_are_dummy = False
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------ Wan VAE: file layouts and key names
def _diffusers_folder(path: Path) -> Optional[Path]:
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file() and any((folder / f).is_file() for f in DIFFUSERS_WEIGHTS):
            return folder
    return None


def resolve_wan_vae(path: Optional[str | Path], wan_folder: Optional[str | Path]) -> Path:
    """``path`` (a file or a diffusers folder) if given, else ``<wan_folder>/Wan2.1_VAE.pth``."""
    if path is None and wan_folder is None:
        raise ValueError(f"the Wan VAE needs vae.path (a {WAN_VAE_FILE}, a .safetensors file or a diffusers "
                         f"AutoencoderKLWan folder) or weights.wan_folder (a folder holding {WAN_VAE_FILE})")
    p = existing_file(path) if path is not None else Path(wan_folder)
    if p.is_dir():
        if (p / WAN_VAE_FILE).is_file():
            return p / WAN_VAE_FILE
        if _diffusers_folder(p) is not None:
            return p
        raise FileNotFoundError(f"{p} holds neither {WAN_VAE_FILE} nor a diffusers AutoencoderKLWan "
                                f"(config.json + {DIFFUSERS_WEIGHTS[0]})")
    if not p.is_file():
        raise FileNotFoundError(f"Wan VAE weights not found: {p}")
    return p


def read_wan_vae(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in Wan names, architecture options found in the file's config) for a resolved path."""
    arch: dict = {}
    if path.is_dir():
        folder = _diffusers_folder(path)
        cfg = json.loads((folder / "config.json").read_text())
        arch = diffusers_arch(cfg, str(folder / "config.json"))
        weights = next(folder / f for f in DIFFUSERS_WEIGHTS if (folder / f).is_file())
        sd = read_state_dict(weights)
    else:
        sd = read_state_dict(path)
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "quant_conv.")) for k in sd):
        sd = diffusers_to_wan(sd, arch.get("num_res_blocks", 2))
    return sd, {**wan_arch_from_tensors(sd), **arch}


def wan_arch_from_tensors(sd: Mapping[str, torch.Tensor]) -> dict:
    """What a Wan VAE state dict says of its architecture: the base width (``encoder.conv1.weight`` is
    [dim, 3, 3, 3, 3]: 96 for ``Wan2.1_VAE.pth``, 24 for ``lightvaew2_1.pth``). Nothing when the key is absent
    (the strict check then names it)."""
    w = sd.get("encoder.conv1.weight")
    return {"dim": int(w.shape[0])} if isinstance(w, torch.Tensor) and w.dim() == 5 else {}


def diffusers_arch(cfg: dict, source: str) -> dict:
    """Our ``WanVAE`` options from a diffusers ``AutoencoderKLWan`` config (rejecting what we do not build)."""
    if cfg.get("is_residual", False) or cfg.get("patch_size") not in (None, 1):
        raise ValueError(f"{source}: the Wan2.2 VAE variant (is_residual / patch_size) is not supported")
    if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
        raise ValueError(f"{source}: decoder_base_dim != base_dim is not supported")
    if cfg.get("attn_scales"):
        raise ValueError(f"{source}: attn_scales {cfg['attn_scales']} are not supported (the Wan VAE has none)")
    arch = dict(dim=cfg.get("base_dim", 96), z_dim=cfg.get("z_dim", 16), dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
                num_res_blocks=cfg.get("num_res_blocks", 2),
                temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))))
    if "latents_mean" in cfg and "latents_std" in cfg:
        arch.update(latents_mean=tuple(cfg["latents_mean"]), latents_std=tuple(cfg["latents_std"]))
    return arch


_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _res_block(rest: str) -> str:
    for src, dst in _RES.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest  # resample.1.* / time_conv.* keep their names


def diffusers_to_wan(sd: Mapping[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKLWan`` names -> official ``Wan2.1_VAE.pth`` names (tensors are not copied).
    Unknown keys pass through unchanged, so the strict check names them."""
    per_level = num_res_blocks + 2  # Wan's decoder.upsamples is flat: (n + 1) res blocks, then an upsampler
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^quant_conv\.", "conv1.", n)
        n = re.sub(r"^post_quant_conv\.", "conv2.", n)
        n = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", n)
        n = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", n)
        n = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", n)
        n = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1.", n)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", n):
            n = f"{m[1]}.middle.{2 * int(m[2])}.{_res_block(m[3])}"
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", n):
            n = f"encoder.downsamples.{m[1]}.{_res_block(m[2])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", n):
            n = f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_res_block(m[3])}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", n):
            n = f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
        out[n] = v
    return out
