"""The streaming-VAE interface the pipeline calls, and a registry of the VAEs that implement it.

    vae = build_vae("wan", path="Wan2.1_VAE.pth", device="cuda", dtype=torch.bfloat16)
    vae = build_vae(cfg.vae, wan_folder=..., taehv_path=..., dummy=False, device=..., dtype=...)
    state = vae.new_state()            # one per stream: every cache of that stream lives here
    z = vae.encode(state, video)       # [B, 3, T, H, W] in [-1, 1] -> [B, F, 16, H/8, W/8]
    x = vae.decode(state, z)           # [B, F, 16, h, w] -> [B, T, 3, H, W] float32 in [-1, 1]
    zs = encode_streams(vae, [s0, s1, s2], videos)   # one call for three streams (row i = stream i)
    xs = decode_streams(vae, [s0, s1, s2], zs)       # each row equal to that stream alone
    vae.release(state)                 # the stream has ended (optional: drops its CUDA graphs)

Frame arithmetic (identical for every VAE, so that the pipeline never branches on the VAE):
  encode: the first call of a stream takes 1 + 4k frames -> 1 + k latents; later calls 4k frames -> k.
  decode: the first call takes F latents -> 1 + 4(F - 1) frames; later calls F latents -> 4F frames.
Anything else is a ``ValueError`` (frames are never dropped silently).

``encode_streams`` / ``decode_streams`` run several streams' chunks as one batched call when the VAE has them
(every VAE here: ``state.py``), else one call per stream. A new VAE is a class with this interface plus a
builder registered with ``@register_vae(name)`` and a file in ``conf/vae/``. Builders take keyword arguments only: the config's options and the run's context
(``wan_folder``, ``taehv_path``, ``dummy``, ``device``, ``dtype``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from ..registry import Registry

VAEStreamState = Any  # each VAE defines its own state class; the pipeline treats it as opaque


@runtime_checkable
class StreamingVAE(Protocol):
    latent_channels: int      # 16
    temporal_stride: int      # 4 frames per latent (after the first frame)
    spatial_stride: int       # 8 pixels per latent cell
    weights_are_dummy: bool   # random weights: outputs are noise, timings are real

    def new_state(self, batch_size: int = 1) -> VAEStreamState: ...
    def encode(self, state: VAEStreamState, video: torch.Tensor) -> torch.Tensor: ...
    def decode(self, state: VAEStreamState, latents: torch.Tensor) -> torch.Tensor: ...


VAES: Registry[Callable[..., StreamingVAE]] = Registry("vae")
register_vae = VAES.register
registered_vaes = VAES.names


def build_vae(name_or_cfg: str | Mapping, **kwargs) -> StreamingVAE:
    """Build a registered VAE from its name (options as kwargs) or a config mapping with ``name``
    (a ``conf/vae/*.yaml`` group); explicit kwargs override the mapping's options."""
    if isinstance(name_or_cfg, str):
        name, opts = name_or_cfg, {}
    else:
        opts = {k: v for k, v in dict(name_or_cfg).items() if k != "name"}
        name = dict(name_or_cfg).get("name")
    builder = VAES.get(name)
    opts.update(kwargs)
    return builder(**opts)


def encode_streams(vae: StreamingVAE, states: list, video: torch.Tensor) -> torch.Tensor:
    """Row i of ``video`` [N, 3, T, H, W] continues stream ``states[i]``: one batched call when the VAE can
    (``vae.encode_streams``), else one call per stream; the same latents either way."""
    fn = getattr(vae, "encode_streams", None)
    if fn is not None:
        return fn(states, video)
    return torch.cat([vae.encode(s, video[i:i + 1]) for i, s in enumerate(states)])


def decode_streams(vae: StreamingVAE, states: list, latents: torch.Tensor) -> torch.Tensor:
    """Row i of ``latents`` [N, F, 16, h, w] continues stream ``states[i]`` (as ``encode_streams``)."""
    fn = getattr(vae, "decode_streams", None)
    if fn is not None:
        return fn(states, latents)
    return torch.cat([vae.decode(s, latents[i:i + 1]) for i, s in enumerate(states)])


def release(vae: StreamingVAE, state) -> None:
    """A stream has ended: let the VAE drop what it kept for it beyond its state (its CUDA graphs)."""
    fn = getattr(vae, "release", None)
    if fn is not None and state is not None:
        fn(state)


def check_video(video: torch.Tensor, first: bool, temporal_stride: int = 4, spatial_stride: int = 8) -> None:
    """The frame-count and shape rules shared by every VAE's ``encode``."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a tensor [B, 3, T, H, W] in [-1, 1], got {shape}")
    t, h, w = video.shape[2:]
    if first and (t - 1) % temporal_stride:
        raise ValueError(f"the first chunk of a stream must have 1 + {temporal_stride}k frames "
                         f"(1, 5, 9, ...), got {t}")
    if not first and (t == 0 or t % temporal_stride):
        raise ValueError(f"chunks after the first must have a positive multiple of {temporal_stride} frames, "
                         f"got {t} (frames are never dropped silently)")
    if h % spatial_stride or w % spatial_stride:
        raise ValueError(f"frame size {h}x{w} must be a multiple of {spatial_stride} in both dimensions")


def check_latents(latents: torch.Tensor, channels: int = 16) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[2] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor [B, F, {channels}, h, w], got {shape}")
    if latents.shape[1] == 0:
        raise ValueError("latents must hold at least one frame")
