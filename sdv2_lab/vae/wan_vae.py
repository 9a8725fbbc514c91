"""The Wan2.1 video VAE (z 16, stride 4x8x8, causal 3-D convs) with streaming encode/decode (reference §1.11).

Why our own module and not diffusers' ``AutoencoderKLWan``: diffusers keeps its causal-conv caches on the
module (one stream at a time), rebuilds them per call with ``clone``/``cat`` into Python lists, and names
parameters differently from the official ``Wan2.1_VAE.pth``. Here the parameter names equal the official
file (diffusers folders are converted on load, ``checkpoints.diffusers_to_wan``) and every piece of
streaming memory lives in a per-stream ``WanVAEState``:

* each causal conv with a time kernel of 3 keeps a *history* of its last 2 input frames: a tensor made
  once (zeros = the reference's zero padding at the stream start), then overwritten in place every call.
  Shapes and addresses never change after a stream's first chunk, so steady-state calls are
  ``torch.compile`` / CUDA-graph friendly (``accel.py``);
* a temporal downsampler keeps its last input frame; its stream's first call (frame 0 alone) skips the
  time conv, which maps frame 0 to its own latent; a temporal upsampler skips doubling on the first call.

Causal convs are sequence-consistent (running 8 frames at once equals two runs of 4), so a whole chunk goes
through the encoder (4k frames) or decoder (k latents) in one call; the reference loops per 4 frames / per
latent. Other speed choices: the time padding comes from the history by one ``cat`` (no ``F.pad`` copy, the
conv pads space itself); nearest-exact x2 upsampling runs in the activation dtype (it only copies values,
so it equals the reference's fp32 round trip bit for bit); optional ``channels_last_3d``.

On CUDA the steady-state steps are replaced by the fused path (``wan_fused.py``, option ``fused``: channels-
last activations, padded history buffers the convs read directly, one-pass norm + SiLU (+ residual) kernel,
sub-pixel upsampling) and replayed as one CUDA graph each (``accel.py``); this module stays the numerical
reference and runs every stream's first call. ``warmup(H, W)`` moves kernel JIT / cuDNN autotuning to start-up.

Latent scaling (reference quirk, §1.11): ``encode`` returns the raw mean mu (``normalize_on_encode=False``)
while ``decode`` un-normalises its input (``denormalize_on_decode=True``: z * std + mean). Set both to True
for a symmetric VAE whose latents are N(0, 1)-scaled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import materialize, read_wan_vae, resolve_wan_vae
from .registry import check_latents, check_video
from .state import Batch, StreamCache, check_same_phase, one_size, release_graphs, restart_parts

log = logging.getLogger(__name__)

CACHE_T = 2  # frames of history a 3-tap causal time kernel needs

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class WanVAEState:
    """Per-stream state of ``WanVAE``: the encoder's and decoder's history (``state.StreamCache``) and
    counters (frames in, latents in)."""
    enc: StreamCache = field(default_factory=StreamCache)
    dec: StreamCache = field(default_factory=StreamCache)
    frames_in: int = 0
    latents_in: int = 0
    size: Optional[tuple[int, int]] = None  # (H, W) of the stream, fixed after its first call

    def restart(self, encoder: bool = True, decoder: bool = True) -> None:
        """Make this (its encoder's and/or decoder's part) a new stream's state in place, as ``new_state()`` would
        (the size kept): the tensors and uids stay, so the CUDA graphs captured for the ended stream replay for
        the new one. The parts apart so that each can be zeroed on the lane that uses it."""
        restart_parts(self, encoder, decoder)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded in time on the left only. ``lookback`` (= 2 x the time padding) previous input
    frames come from the stream's history, which is then replaced by the last ``lookback`` frames seen."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, padding[1], padding[2]))
        self.lookback = 2 * padding[0]
        self.slot = -1  # set by WanVAE: where this conv's history lives in a StreamCache

    def forward(self, x: torch.Tensor, cache: Optional[Batch] = None) -> torch.Tensor:
        if self.lookback == 0:
            return super().forward(x)
        x = torch.cat([cache.history(self.slot, x, self.lookback), x], dim=2)
        cache.keep(self.slot, x[:, :, -self.lookback:])
        return super().forward(x)


class RMSNorm(nn.Module):
    """``F.normalize`` over channels x sqrt(C) x gamma (no bias), as the reference's ``RMS_norm``."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # indices 0..6 are the official key names (residual.0.gamma, residual.2.weight, ...)
        self.residual = nn.Sequential(RMSNorm(cin, images=False), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
                                      RMSNorm(cout, images=False), nn.SiLU(), nn.Dropout(0.0),
                                      CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        r = self.residual
        h = r[2](r[1](r[0](x)), cache)
        h = r[6](r[4](r[3](h)), cache)  # r[5] is a p=0 dropout
        return h + self.shortcut(x)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``fn`` to every frame of [B, C, T, H, W]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (no temporal state)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c]
        return x + self.proj(y.squeeze(1).transpose(1, 2).unflatten(2, (h, w)))

    def forward(self, x: torch.Tensor, cache: Optional[Batch] = None) -> torch.Tensor:
        return _per_frame(self._frame, x)


class Resample(nn.Module):
    """x2 spatial down/up sampling, optionally with x2 in time (down3d / up3d). Official key names:
    ``resample.1.*`` (the 2-D conv) and ``time_conv.*``."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode, self.slot = mode, -1
        if mode.startswith("up"):
            # nearest-exact x2 only copies values, so running it in bf16 equals the reference's fp32 round trip
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        if self.mode == "upsample3d" and not cache.first:  # the stream's first latent is not doubled in time
            y = self.time_conv(x, cache)  # [B, 2C, T, H, W]: channel halves are the even / odd output frames
            b, c2, t, h, w = y.shape
            x = y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            if cache.first:  # frame 0 keeps its own latent: remember it, no temporal downsampling
                cache.history(self.slot, x, 1)
                cache.keep(self.slot, x[:, :, -1:])
            else:
                x = torch.cat([cache.history(self.slot, x, 1), x], dim=2)
                cache.keep(self.slot, x[:, :, -1:])
                x = self.time_conv(x)
        return x


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool]):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(cout, cout), AttentionBlock(cout), ResidualBlock(cout, cout))
        self.head = nn.Sequential(RMSNorm(cout, images=False), nn.SiLU(), CausalConv3d(cout, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool]):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # every upsampler halves the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(cout, images=False), nn.SiLU(), CausalConv3d(cout, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE behind the ``StreamingVAE`` interface (``registry.py``)."""
    latent_channels, temporal_stride, spatial_stride = 16, 4, 8

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temporal_downsample: Sequence[bool] = (False, True, True),
                 normalize_on_encode: bool = False, denormalize_on_decode: bool = True,
                 latents_mean: Sequence[float] = LATENT_MEAN, latents_std: Sequence[float] = LATENT_STD,
                 channels_last: bool = False):
        super().__init__()
        if z_dim != self.latent_channels:
            raise ValueError(f"z_dim must be {self.latent_channels}, got {z_dim}")
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean / latents_std need {z_dim} values each")
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1])
        for part in (self.encoder, self.decoder):
            cached = [m for m in part.modules() if isinstance(m, Resample) or getattr(m, "lookback", 0)]
            for i, m in enumerate(cached):
                m.slot = i
        self.normalize_on_encode, self.denormalize_on_decode = normalize_on_encode, denormalize_on_decode
        self.latents_mean, self.latents_std = tuple(latents_mean), tuple(latents_std)
        self.channels_last = channels_last
        self.weights_are_dummy = False
        self._scales: dict = {}
        self._steps = {"encode": self._encode_step, "decode": self._decode_step}  # accel.py may replace these

    # ------------------------------------------------------------------ interface
    def new_state(self, batch_size: int = 1) -> WanVAEState:
        return WanVAEState()

    def encode(self, state: WanVAEState, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> latents [B, F, 16, H/8, W/8]; T = 1 + 4k on a stream's first
        call (k + 1 latents), 4k afterwards (k latents)."""
        return self.encode_streams([state], video)

    def decode(self, state: WanVAEState, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, 16, h, w] -> frames [B, T, 3, 8h, 8w] float32 in [-1, 1]; T = 1 + 4(F - 1) on a
        stream's first call, 4F afterwards."""
        return self.decode_streams([state], latents)

    @torch.no_grad()
    def encode_streams(self, states: list[WanVAEState], video: torch.Tensor) -> torch.Tensor:
        """One call for several streams: row i of ``video`` continues stream ``states[i]`` (all at their first
        call, or all past it); equal to encoding each stream alone."""
        first = check_same_phase(states, "frames_in")
        check_video(video, first, self.temporal_stride, self.spatial_stride)
        one_size(states, video.shape[-2:], "video")
        cache = Batch([s.enc for s in states])
        x = self._layout(video.to(self.conv1.weight.dtype))
        mu = _first_alone(x, cache, first, self._encode_step, self._steps["encode"])
        for s in states:
            s.frames_in += video.shape[2]
        mu = mu.transpose(1, 2).contiguous()
        if self.normalize_on_encode:
            mean, inv_std = self._scale(mu)
            mu = (mu - mean) * inv_std
        return mu

    @torch.no_grad()
    def decode_streams(self, states: list[WanVAEState], latents: torch.Tensor) -> torch.Tensor:
        """One call for several streams: row i of ``latents`` continues stream ``states[i]``."""
        check_latents(latents, self.z_dim)
        first = check_same_phase(states, "latents_in")
        one_size(states, tuple(s * self.spatial_stride for s in latents.shape[-2:]), "latents (x8)")
        cache = Batch([s.dec for s in states])
        z = latents.to(self.conv2.weight.dtype)
        if self.denormalize_on_decode:
            mean, inv_std = self._scale(z)
            z = z / inv_std + mean  # divide by 1/std as the reference does, so bf16 rounding matches
        z = self._layout(z.transpose(1, 2))
        x = _first_alone(z, cache, first, self._decode_step, self._steps["decode"])
        for s in states:
            s.latents_in += latents.shape[1]
        return x.float().clamp_(-1, 1).transpose(1, 2)

    def release(self, state: WanVAEState) -> None:
        """The stream has ended: drop the CUDA graphs captured for batches that include it."""
        release_graphs(self._steps, [state], ("enc", "dec"))

    @torch.no_grad()
    def warmup(self, height: int, width: int, batch_size: int = 1, chunks: int = 3) -> float:
        """Run a throw-away stream (a first chunk, then ``chunks - 1`` steady ones, encode and decode) at
        this size so that kernel JIT compilation and cuDNN autotuning happen now, at start-up, not in a
        user's first chunks; returns the seconds it took. Streams made later still capture their own CUDA
        graph (on their batch's second call, ~ one chunk's time)."""
        import time
        p = next(self.parameters())
        t0 = time.perf_counter()
        st = self.new_state(batch_size)
        video = torch.zeros(batch_size, 3, 5, height, width, device=p.device, dtype=p.dtype)
        z = self.encode(st, video)
        self.decode(st, z)
        for _ in range(chunks - 1):
            self.decode(st, self.encode(st, video[:, :, 1:]))
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        self.release(st)   # its graphs are not needed again (a new stream's batch captures its own)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ one encoder / decoder call
    # Pure functions of (input, cache tensors): no Python-side state changes, so that accel.py can compile
    # them or replay them from a CUDA graph.
    def _encode_step(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        h = self.encoder(x, cache)
        w, b = self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim]  # mu only; log-variance unused
        return F.conv3d(h, w, b)

    def _decode_step(self, z: torch.Tensor, cache: Batch) -> torch.Tensor:
        return self.decoder(self.conv2(z), cache)

    # ------------------------------------------------------------------ helpers
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) shaped [1, 1, 16, 1, 1] in ``like``'s dtype/device, made once (no per-call copy)."""
        key = (like.device, like.dtype)
        if key not in self._scales:
            shape = (1, 1, self.z_dim, 1, 1)
            mean = torch.tensor(self.latents_mean, dtype=torch.float32).to(like.device, like.dtype).view(shape)
            std = torch.tensor(self.latents_std, dtype=torch.float32).to(like.device, like.dtype).view(shape)
            self._scales[key] = (mean, 1.0 / std)
        return self._scales[key]


ARCH_KEYS = ("dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample", "latents_mean", "latents_std")
OPTION_KEYS = ("normalize_on_encode", "denormalize_on_decode", "channels_last")


def load_wan_vae(path: Optional[str | Path] = None, *, wan_folder: Optional[str | Path] = None, dummy: bool = False,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, source: Optional[str] = None,
                 **options) -> WanVAE:
    """A ready ``WanVAE``: from an official ``.pth``, a ``.safetensors`` file, a diffusers folder, a Wan
    folder, or random (``dummy=True``, flagged ``weights_are_dummy``). ``options``: ``ARCH_KEYS`` and
    ``OPTION_KEYS``. With a file, the architecture is the file's (its tensors' shapes, a diffusers config): an
    option that says otherwise is logged and the file wins, as the DiT's sizes come from its ``config.json``
    (the config's ``dim`` is the width of dummy weights). ``source``: where the file is configured, for the
    not-found message (e.g. ``weights.lightvae``)."""
    unknown = sorted(set(options) - set(ARCH_KEYS) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown Wan VAE options {unknown}; known: {sorted(ARCH_KEYS + OPTION_KEYS)}")
    if dummy:
        return materialize(lambda: WanVAE(**options), None, "dummy", device, dtype)
    try:
        src = resolve_wan_vae(path, wan_folder)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (set by {source})" if source else str(exc)) from None
    sd, arch = read_wan_vae(src)
    for k, v in arch.items():
        if k in options and k not in ("latents_mean", "latents_std") and tuple(_listify(options[k])) != tuple(_listify(v)):
            log.info("vae.%s=%r, but %s holds a Wan VAE with %s=%r: built as the file says", k, options[k], src, k, v)
    own = {k: v for k, v in options.items() if k in ("latents_mean", "latents_std") or k not in arch}
    return materialize(lambda: WanVAE(**{**arch, **own}), sd, str(src), device, dtype)


def _first_alone(x: torch.Tensor, cache: Batch, first: bool, step_first, step) -> torch.Tensor:
    """A stream's first call: frame 0 (latent 0) alone through ``step_first`` (it has a latent of its own), then
    the rest in one ``step``; later calls: one ``step``. ``x`` is [B, C, T, H, W]."""
    if not first:
        return step(x, cache)
    out = [step_first(x[:, :, :1], cache)]
    cache.first = False
    if x.shape[2] > 1:
        out.append(step(x[:, :, 1:], cache))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _listify(v):
    return v if isinstance(v, (list, tuple)) else [v]
