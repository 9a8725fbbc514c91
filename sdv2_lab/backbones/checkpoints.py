"""Readers for the official DiT checkpoint formats, key converters, strict checks and dummy weights.

Accepted ``weights``:
* a Wan2.1 folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or the sharded set with
  ``diffusion_pytorch_model.safetensors.index.json`` (original Wan key names);
* a StreamDiffusionV2 ``model.pt`` (or a folder holding one): a dict with ``generator``, ``generator_ema`` or
  ``state_dict`` (first hit wins, as the reference), or a flat state dict; keys with or without ``model.``;
* a diffusers ``WanTransformer3DModel`` folder or file (its key names are converted);
* any single ``.safetensors`` / ``.pt`` / ``.pth`` state dict in one of those namings;
* ``"dummy"``: random init at the configured size, directly on the device (for throughput work).

Loading is strict (missing, unexpected or mis-shaped keys raise, naming the file) and goes through the
meta device: every tensor is read (memory-mapped), cast and moved on its own, so a 14B checkpoint needs
about its bf16 size in device memory and no fp32 copy.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from .wan_dit import CausalWanDiT, WanDiTConfig

log = logging.getLogger(__name__)

WAN_SINGLE = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SDV2_FILE = "model.pt"
SDV2_CONTAINER_KEYS = ("generator", "generator_ema", "state_dict")  # checked in this order, as the reference

# diffusers WanTransformer3DModel -> original Wan names (the inverse of diffusers' convert script). Order
# matters: block-level norms are swapped (diffusers norm2 is Wan's affine cross-attention norm3).
_DIFFUSERS_RULES: list[tuple[str, str]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the configured model."""


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def convert_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _DIFFUSERS_RULES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


def to_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers names (for exporting and for round-trip tests)."""
    inverse = [
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"^head\.modulation$", "scale_shift_table"),
        (r"^head\.head\.", "proj_out."),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
        (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
        (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
        (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
        (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    ]
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in inverse:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------- file reading
def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping), found {type(obj).__name__}")
    for key in SDV2_CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            log.info("%s: using the %r entry", path, key)
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict; non-tensor entries {bad[:5]} "
                              f"(expected one of {SDV2_CONTAINER_KEYS} or a flat dict of tensors)")
    return dict(obj)


def resolve_weight_files(weights: str | Path) -> tuple[list[Path], Optional[dict]]:
    """The tensor files behind ``weights`` and the folder's config.json (if any)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DiT weights not found: {path}")
    if path.is_file():
        cfg_file = path.parent / "config.json"
        return [path], (json.loads(cfg_file.read_text()) if cfg_file.name and cfg_file.exists()
                        and path.suffix == ".safetensors" else None)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if (path / WAN_INDEX).exists():
        index = json.loads((path / WAN_INDEX).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).exists()]
        if not shards or missing:
            raise FileNotFoundError(f"{path / WAN_INDEX}: shard files missing: {missing or 'index lists none'}")
        return [path / s for s in shards], config
    for name in (WAN_SINGLE, SDV2_FILE):
        if (path / name).exists():
            return [path / name], config
    found = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(f"{path}: no DiT weights; expected {WAN_SINGLE}, {WAN_INDEX} (+ shards) or {SDV2_FILE}; "
                            f"found {found}")


def read_state_dict(weights: str | Path) -> tuple[dict[str, torch.Tensor], str, Optional[dict]]:
    """Read and normalise a checkpoint's keys to the original Wan names. Returns (state dict, source, config)."""
    files, config = resolve_weight_files(weights)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_read_tensor_file(f))
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    if is_diffusers_layout(sd):
        sd = convert_diffusers_keys(sd)
    return sd, ", ".join(str(f) for f in files), config


def check_config(cfg: WanDiTConfig, config: Optional[dict], source: str) -> None:
    """A Wan folder's config.json must describe the configured size (it names dim/num_layers/...)."""
    if not config:
        return
    aliases = {"dim": ("dim",), "ffn_dim": ("ffn_dim",), "num_heads": ("num_heads", "num_attention_heads"),
               "num_layers": ("num_layers",)}
    for ours, theirs in aliases.items():
        for key in theirs:
            if key in config and int(config[key]) != getattr(cfg, ours):
                raise CheckpointError(f"{source}: config.json has {key}={config[key]} but backbone {cfg.name!r} "
                                      f"expects {ours}={getattr(cfg, ours)}; pick the backbone that fits the file")


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
              if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        parts = [f"checkpoint {source} does not fit backbone {name!r}:"]
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped keys, e.g. " + "; ".join(
                f"{k}: file {s} vs model {e}" for k, s, e in shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise CheckpointError("\n  ".join(parts))


# ---------------------------------------------------------------------------------------------- building
def load_backbone(cfg: WanDiTConfig, weights: str | Path | None, *, device="cpu", dtype=torch.bfloat16,
                  seed: int = 0) -> CausalWanDiT:
    """Build the DiT of ``cfg`` on ``device``/``dtype`` with ``weights`` (a path, or ``"dummy"``/None)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    if weights is None or str(weights) == "dummy":
        model.to_empty(device=device)
        model.to(dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(g)
        model.weights_are_dummy = True
        model.fuse_qkv()
        log.warning("DiT %s uses DUMMY (random) weights: outputs are noise; use them for throughput only", cfg.name)
        return model.eval().requires_grad_(False)
    sd, source, config = read_state_dict(weights)
    check_config(cfg, config, source)
    check_state_dict(model, sd, source)
    # Cast/move one tensor at a time so peak memory is one target-dtype copy.
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    del sd
    model.fuse_qkv()
    return model.eval().requires_grad_(False)
