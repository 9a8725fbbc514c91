"""The Wan2.1 video VAE (z 16, stride 4x8x8, causal 3-D convs) with streaming encode/decode (reference §1.11).

Parameter names equal the official ``Wan2.1_VAE.pth``. The streaming state (the causal convs' last input
frames, the temporal resamplers' memories) lives in a ``WanVAEState`` per stream, never in the modules, so
two streams never share caches and a new state is a new stream.

Streaming arithmetic (as the reference): the first ``encode`` of a stream takes 1 + 4k frames and encodes
frame 0 alone, then the rest, giving 1 + k latents; later calls take 4k frames, one latent per 4 frames.
``decode`` mirrors it: the first call decodes latent 0 alone (1 frame), then each latent gives 4 frames.

Latent scaling follows the reference by default: ``encode`` returns the raw mean (``normalize_on_encode =
False``) while ``decode`` un-normalises (``denormalize_on_decode = True``: z * std + mean). This asymmetry is
how the StreamDiffusionV2 DiT was run; flip the flags for a symmetric VAE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames a 3x3x3 causal conv needs from the previous call

LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

_FIRST = "first"  # marker: an upsampling time conv that has seen only the first (single-frame) call


class ConvCache:
    """The per-stream memory of one encoder or decoder: one slot per cached conv, in call order."""

    def __init__(self):
        self.slots: list = []
        self.i = 0

    def begin(self) -> "ConvCache":
        self.i = 0
        return self

    def get(self):
        if self.i == len(self.slots):
            self.slots.append(None)
        return self.slots[self.i]

    def put(self, value) -> None:
        self.slots[self.i] = value
        self.i += 1


@dataclass
class WanVAEState:
    enc: ConvCache = field(default_factory=ConvCache)
    dec: ConvCache = field(default_factory=ConvCache)
    encoded_frames: int = 0
    decoded_latents: int = 0


class CausalConv3d(nn.Conv3d):
    """Pads time on the left only; with a cache, the previous call's last frames replace the zero padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x, prev: Optional[torch.Tensor] = None):
        pad = list(self._pad)
        if prev is not None and pad[4] > 0:
            x = torch.cat([prev.to(x.dtype), x], dim=2)
            pad[4] -= prev.shape[2]
        return super().forward(F.pad(x, pad))

    def stream(self, x, cache: Optional[ConvCache]):
        """Run with the stream's memory of this conv's input and update it (last CACHE_T input frames)."""
        if cache is None:
            return self(x)
        prev = cache.get()
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and prev is not None:
            keep = torch.cat([prev[:, :, -1:], keep], dim=2)
        out = self(x, prev)
        cache.put(keep.clone())
        return out


class RMSNorm(nn.Module):
    """``F.normalize`` over channels times sqrt(C) times gamma (the reference's RMS_norm, no bias)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache: Optional[ConvCache] = None):
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer.stream(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no temporal state)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _spatial(self, x):
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        if self.mode.startswith("up"):  # nearest upsampling in fp32 (bf16 support), as the reference
            y = self.resample[1](self.resample[0](y.float()).type_as(y))
        else:
            y = self.resample(y)
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def forward(self, x, cache: Optional[ConvCache] = None):
        if self.mode == "upsample3d" and cache is not None:
            prev = cache.get()
            if prev is None:
                cache.put(_FIRST)  # the first frame of a stream is not doubled in time
            else:
                keep = x[:, :, -CACHE_T:]
                if keep.shape[2] < CACHE_T:
                    lead = torch.zeros_like(keep[:, :, -1:]) if isinstance(prev, str) else prev[:, :, -1:]
                    keep = torch.cat([lead, keep], dim=2)
                y = self.time_conv(x) if isinstance(prev, str) else self.time_conv(x, prev)
                cache.put(keep.clone())
                b, c2, t, h, w = y.shape
                y = y.reshape(b, 2, c2 // 2, t, h, w)
                x = torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c2 // 2, 2 * t, h, w)
        x = self._spatial(x)
        if self.mode == "downsample3d" and cache is not None:
            prev = cache.get()
            if prev is None:
                cache.put(x.clone())  # frame 0 keeps its own latent: no temporal downsampling yet
            else:
                cache.put(x[:, :, -1:].clone())
                x = self.time_conv(torch.cat([prev[:, :, -1:], x], dim=2))
        return x


def _run(layers, x, cache):
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = layer.stream(x, cache)
        elif isinstance(layer, (ResidualBlock, AttentionBlock, Resample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample):
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        down = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                down.append(ResidualBlock(din, dout))
                din = dout
            if i != len(dim_mult) - 1:
                down.append(Resample(dout, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*down)
        self.middle = nn.Sequential(ResidualBlock(dout, dout), AttentionBlock(dout), ResidualBlock(dout, dout))
        self.head = nn.Sequential(RMSNorm(dout, images=False), nn.SiLU(), CausalConv3d(dout, z_dim, 3, padding=1))

    def forward(self, x, cache: Optional[ConvCache] = None):
        x = self.conv1.stream(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        up = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                din = din // 2  # the previous upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                up.append(ResidualBlock(din, dout))
                din = dout
            if i != len(dim_mult) - 1:
                up.append(Resample(dout, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*up)
        self.head = nn.Sequential(RMSNorm(dout, images=False), nn.SiLU(), CausalConv3d(dout, 3, 3, padding=1))

    def forward(self, x, cache: Optional[ConvCache] = None):
        x = self.conv1.stream(x, cache)
        return _run(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE with the streaming interface of ``sdv2_lab.vae.base.StreamingVAE``."""
    latent_channels, temporal_stride, spatial_stride = 16, 4, 8

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True), normalize_on_encode: bool = False,
                 denormalize_on_decode: bool = True):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, list(temporal_downsample))
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, list(temporal_downsample)[::-1])
        self.normalize_on_encode = normalize_on_encode
        self.denormalize_on_decode = denormalize_on_decode
        self._scales: dict = {}  # (device, dtype) -> (mean, 1/std): made once, not a per-call copy
        self.weights_are_dummy = False

    def new_state(self, batch_size: int = 1) -> WanVAEState:
        return WanVAEState()

    def _scale(self, dtype):
        """(mean, 1/std) in ``dtype``: the reference multiplies/divides by the reciprocal; so do we, so that
        bf16 rounding matches too."""
        device = self.conv2.weight.device
        if (device, dtype) not in self._scales:
            shape = (1, 1, self.z_dim, 1, 1)
            mean = torch.tensor(LATENT_MEAN, dtype=torch.float32).to(device, dtype).view(shape)
            std = torch.tensor(LATENT_STD, dtype=torch.float32).to(device, dtype).view(shape)
            self._scales[(device, dtype)] = (mean, 1.0 / std)
        return self._scales[(device, dtype)]

    @torch.no_grad()
    def encode(self, state: WanVAEState, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> latents [B, F, 16, H/8, W/8]."""
        self._check_video(video, first=state.encoded_frames == 0)
        video = video.to(self.conv1.weight.dtype)
        if state.encoded_frames == 0:
            pieces = [video[:, :, :1], video[:, :, 1:]] if video.shape[2] > 1 else [video[:, :, :1]]
        else:
            pieces = list(video.split(self.temporal_stride, dim=2))
        out = torch.cat([self.encoder(p, state.enc.begin()) for p in pieces], dim=2)
        state.encoded_frames += video.shape[2]
        mu = self.conv1(out)[:, : self.z_dim].transpose(1, 2)
        if self.normalize_on_encode:
            mean, inv_std = self._scale(mu.dtype)
            mu = (mu - mean) * inv_std
        return mu

    @torch.no_grad()
    def decode(self, state: WanVAEState, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, 16, h, w] -> frames [B, T, 3, 8h, 8w] in [-1, 1]."""
        if latents.dim() != 5 or latents.shape[2] != self.z_dim:
            raise ValueError(f"latents must be [B, F, {self.z_dim}, h, w], got {tuple(latents.shape)}")
        z = latents.to(self.conv2.weight.dtype)
        if self.denormalize_on_decode:
            mean, inv_std = self._scale(z.dtype)
            z = z / inv_std + mean
        x = self.conv2(z.transpose(1, 2))
        if state.decoded_latents == 0:
            pieces = [x[:, :, :1], x[:, :, 1:]] if x.shape[2] > 1 else [x]
        else:
            pieces = list(x.split(1, dim=2))
        out = torch.cat([self.decoder(p, state.dec.begin()) for p in pieces], dim=2)
        state.decoded_latents += latents.shape[1]
        return out.clamp(-1, 1).transpose(1, 2)

    def _check_video(self, video: torch.Tensor, first: bool) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        t = video.shape[2]
        if first and (t - 1) % self.temporal_stride:
            raise ValueError(f"the first chunk of a stream must have 1 + 4k frames (5, 9, ...), got {t}")
        if not first and (t == 0 or t % self.temporal_stride):
            raise ValueError(f"chunks after the first must have a multiple of 4 frames, got {t} "
                             f"(frames are never dropped silently)")
        if video.shape[3] % 8 or video.shape[4] % 8:
            raise ValueError(f"frame size {video.shape[3]}x{video.shape[4]} is not a multiple of 8")
