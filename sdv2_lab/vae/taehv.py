"""TAEHV, the tiny video autoencoder for Wan2.1 latents (``taew2_1.pth``, reference §1.12), with streaming that
keeps its per-layer memory between chunks.

TAEHV is 2-D convs plus ``MemBlock``s that also see the *previous frame's* input of the same block. The
reference re-decodes up to 3 latents of context with every new latent (starting from zero memory, 4x the
work, and not equal to a one-shot decode). Here each MemBlock's last input frame is kept in the stream's
cache, so decoding chunk by chunk equals one-shot decoding of the whole latent sequence and costs one
latent's work per latent.

Frame accounting. TAEHV decodes each latent to 4 frames (``TGrow`` x2 x2). Wan latent 0 stands for frame 0
alone, so upstream TAEHV trims the first ``frames_to_trim = 3`` frames of a decode. We do the same on a
stream's first call: F latents -> 4F - 3 = 1 + 4(F - 1) frames (2 latents -> 5 frames, exactly as the Wan VAE),
later calls 4F frames. The reference instead drops all 4 frames of latent 0 on its first call (2 latents ->
4 frames: our first-chunk frames [1:5]; the first input frame is lost, §5 item 21) and its later chunks
differ from ours slightly because its context window restarts TAEHV's memory from zero.

Output: TAEHV produces ~[0, 1]; we return ``2x - 1`` clamped to [-1, 1] (float32), as the reference. Its
input is the DiT latent as is (no mean/std), as the reference.

The pipeline VAE ``TAEHVVAE`` (registry name ``taehv``) encodes with the Wan VAE (the reference's choice;
``encoder="taehv"`` uses TAEHV's own encoder instead: a stream's first frame is repeated 4x so that frame 0
maps to its own latent) and decodes with TAEHV.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoints import materialize, read_state_dict
from ..units import to_unit
from .registry import check_latents, check_video, register_vae
from .wan_vae import StreamCache, WanVAE, WanVAEState

log = logging.getLogger(__name__)


def conv(cin: int, cout: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """conv(concat(x, previous frame's x)) + skip(x), ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv(cin * 2, cout), nn.ReLU(inplace=True), conv(cout, cout), nn.ReLU(inplace=True),
                                  conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge ``stride`` consecutive frames (stacked on channels) with a 1x1 conv."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c * stride, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """Split each frame into ``stride`` frames with a 1x1 conv to ``c * stride`` channels."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


def run_with_memory(layers: nn.Sequential, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Run [B, T, C, H, W] through ``layers``, all T frames at once; each MemBlock's memory of the previous
    frame comes from ``cache`` (zeros at a stream's start) and is replaced by this chunk's last frame."""
    b = x.shape[0]
    x = x.flatten(0, 1)
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            frames = x.unflatten(0, (b, -1))
            mem = cache.history.get(i)
            if mem is None:
                mem = cache.history[i] = torch.zeros_like(frames[:, :1])
            past = torch.cat([mem, frames[:, :-1]], 1).flatten(0, 1)
            mem.copy_(frames[:, -1:])
            x = layer(x, past)
        else:
            x = layer(x)
    return x.unflatten(0, (b, -1))


class TAEHV(nn.Module):
    """The TAEHV module tree; ``state_dict`` keys equal ``taew2_1.pth`` (``encoder.<i>.*``, ``decoder.<i>.*``)."""
    latent_channels, image_channels = 16, 3

    def __init__(self, time_upscale: Sequence[bool] = (True, True), space_upscale: Sequence[bool] = (True, True, True)):
        super().__init__()
        c, z = 64, self.latent_channels
        self.encoder = nn.Sequential(
            conv(self.image_channels, c), nn.ReLU(inplace=True),
            TPool(c, 2), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            TPool(c, 2), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            TPool(c, 1), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            conv(c, z))
        n = (256, 128, 64, 64)
        t1, t2 = (2 if u else 1 for u in time_upscale)
        s1, s2, s3 = (2 if u else 1 for u in space_upscale)
        self.frames_to_trim = t1 * t2 - 1  # the extra frames latent 0 decodes to (it stands for one frame)
        self.decoder = nn.Sequential(
            Clamp(), conv(z, n[0]), nn.ReLU(inplace=True),
            MemBlock(n[0], n[0]), MemBlock(n[0], n[0]), MemBlock(n[0], n[0]),
            nn.Upsample(scale_factor=s1), TGrow(n[0], 1), conv(n[0], n[1], bias=False),
            MemBlock(n[1], n[1]), MemBlock(n[1], n[1]), MemBlock(n[1], n[1]),
            nn.Upsample(scale_factor=s2), TGrow(n[1], t1), conv(n[1], n[2], bias=False),
            MemBlock(n[2], n[2]), MemBlock(n[2], n[2]), MemBlock(n[2], n[2]),
            nn.Upsample(scale_factor=s3), TGrow(n[2], t2), conv(n[2], n[3], bias=False),
            nn.ReLU(inplace=True), conv(n[3], self.image_channels))
        self.weights_are_dummy = False

    def patch_tgrow(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's TGrow weights are for x2 time upscaling; with upscaling off keep the last rows
        (the last of the grown frames), as the reference's ``patch_tgrow_layers``."""
        sd = dict(sd)
        for i, layer in enumerate(self.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > layer.conv.weight.shape[0]:
                sd[key] = sd[key][-layer.conv.weight.shape[0]:]
        return sd

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot: [B, F, 16, h, w] -> [B, 4F, 3, H, W] in ~[0, 1] (untrimmed, as the reference)."""
        return run_with_memory(self.decoder, latents.to(self.decoder[1].weight.dtype), StreamCache())

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """One-shot: [B, 4F, 3, H, W] in [0, 1] -> [B, F, 16, H/8, W/8]."""
        return run_with_memory(self.encoder, frames.to(self.encoder[0].weight.dtype), StreamCache())


@torch.no_grad()
def visible_dummy_(model: TAEHV) -> TAEHV:
    """Dummy weights that decode to visible noise. The generic dummy init keeps activations O(1) through the
    normalised stacks of the Wan models; TAEHV's decoder has no norms, so through its ~30 ReLU convs the output
    decays to ~0, which is a solid black frame (2x - 1 = -1) while the page says "noise". Twice the scale
    (He's gain for ReLU) and the last conv's bias at 0.5 give noise around mid grey (std ~0.25)."""
    for p in model.decoder.parameters():
        if p.dim() == 4:
            p.mul_(2.0)
    model.decoder[-1].bias.fill_(0.5)
    return model


def load_taehv(path: Optional[str | Path], *, dummy: bool = False, device="cpu", dtype=torch.float32,
               time_upscale: Sequence[bool] = (True, True), space_upscale: Sequence[bool] = (True, True, True)) -> TAEHV:
    def make():
        return TAEHV(time_upscale, space_upscale)
    if dummy:
        return visible_dummy_(materialize(make, None, "dummy", device, dtype))
    if path is None:
        raise ValueError("TAEHV needs vae.path or weights.taehv (a taew2_1.pth)")
    with torch.device("meta"):
        shapes = make()
    sd = shapes.patch_tgrow(read_state_dict(path))
    return materialize(make, sd, str(path), device, dtype)


@dataclass
class TAEHVState:
    """Per-stream state of ``TAEHVVAE``: the Wan encoder's state (or TAEHV encoder memory) and the TAEHV
    decoder's MemBlock memory."""
    wan: Optional[WanVAEState] = None
    enc: StreamCache = field(default_factory=StreamCache)
    dec: StreamCache = field(default_factory=StreamCache)
    frames_in: int = 0
    latents_in: int = 0


class TAEHVVAE(nn.Module):
    """Streaming VAE: Wan VAE encoder (or TAEHV's) + TAEHV decoder, the ``StreamingVAE`` interface."""
    latent_channels, temporal_stride, spatial_stride = 16, 4, 8

    def __init__(self, taehv: TAEHV, wan: Optional[WanVAE] = None):
        super().__init__()
        if taehv.frames_to_trim != 3:
            raise ValueError("streaming needs TAEHV with x4 time upscaling (time_upscale=(True, True))")
        self.taehv, self.wan = taehv, wan
        self.weights_are_dummy = bool(taehv.weights_are_dummy or (wan is not None and wan.weights_are_dummy))
        self._steps = {"decode": self._decode_step, "encode": self._encode_step}  # accel.py may replace these

    def new_state(self, batch_size: int = 1) -> TAEHVState:
        return TAEHVState(wan=self.wan.new_state(batch_size) if self.wan is not None else None)

    @torch.no_grad()
    def encode(self, state: TAEHVState, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> [B, F, 16, H/8, W/8] (same frame rules as the Wan VAE)."""
        if self.wan is not None:
            return self.wan.encode(state.wan, video)
        first = state.frames_in == 0
        check_video(video, first, self.temporal_stride, self.spatial_stride)
        x = to_unit(video, self.taehv.encoder[0].weight.dtype).transpose(1, 2)
        state.frames_in += video.shape[2]
        if first:  # frame 0 repeated to a group of 4 of its own -> its own latent
            x = torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1)
            return self._encode_step(x, state.enc)
        return self._steps["encode"](x, state.enc)

    @torch.no_grad()
    def decode(self, state: TAEHVState, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, 16, h, w] -> frames [B, T, 3, 8h, 8w] float32 in [-1, 1]; T = 4F - 3 on a stream's
        first call (TAEHV's warm-up frames of latent 0 trimmed), 4F afterwards."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.taehv.decoder[1].weight.dtype)
        if state.latents_in == 0:
            y = self._decode_step(z, state.dec)[:, self.taehv.frames_to_trim:]
        else:
            y = self._steps["decode"](z, state.dec)
        state.latents_in += latents.shape[1]
        return y.float().mul_(2).sub_(1).clamp_(-1, 1)

    def _decode_step(self, z: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return run_with_memory(self.taehv.decoder, z, cache)

    def _encode_step(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return run_with_memory(self.taehv.encoder, x, cache)


@register_vae("taehv")
def build_taehv_vae(*, path=None, taehv_path=None, wan_path=None, wan_folder=None, encoder: str = "wan",
                    dummy: bool = False, device="cpu", dtype: torch.dtype = torch.float32, taehv_dtype=None,
                    accelerate: str = "none", fused="auto", **wan_options) -> TAEHVVAE:
    """Registry entry ``taehv`` (``conf/vae/taehv.yaml``, ``taehv_full.yaml``): TAEHV from ``path`` or the
    run's ``taehv_path``; with ``encoder: wan`` the Wan encoder from ``wan_path`` or ``wan_folder``
    (``wan_options``: ``WanVAE`` options such as ``dim``; ``fused``: its fused path, see ``wan_fused.py``),
    with ``encoder: taehv`` TAEHV's own encoder (V2V with no Wan VAE at all). ``taehv_dtype``: TAEHV's
    dtype (default: ``dtype``), e.g. ``float16`` as upstream intends."""
    from .accel import accelerate_vae
    from .wan_vae import build_fast_wan_vae
    if encoder not in ("wan", "taehv"):
        raise ValueError(f"vae.encoder must be 'wan' or 'taehv', got {encoder!r}")
    if isinstance(taehv_dtype, str):
        taehv_dtype = getattr(torch, taehv_dtype)
    taehv = load_taehv(path or taehv_path, dummy=dummy, device=device, dtype=taehv_dtype or dtype)
    wan = None
    if encoder == "wan":
        wan = build_fast_wan_vae(wan_path, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype,
                                 accelerate=accelerate, fused=fused, **wan_options)
    elif wan_options:
        raise ValueError(f"Wan VAE options {sorted(wan_options)} given but vae.encoder is 'taehv'")
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerate_vae(TAEHVVAE(taehv, wan), accelerate)
