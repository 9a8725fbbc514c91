"""The Wan VAE's steady-state encode and decode as few, large passes: the "fused" path (``vae.fused``).

The eager module (``wan_vae.py``) stays the numerical reference and runs every stream's first call (frame 0
/ latent 0 alone). After that ``install_fused`` replaces its two steps (``vae._steps``) by these, which
compute the same function of the same weights with less memory traffic between the convolutions:

* channels-last 3-D activations end to end (weights converted once, in place), so cuDNN runs its fast NHWC
  kernels and per-frame 2-D ops see plain views (no layout copies between layers);
* every causal 3-tap conv reads one padded input buffer ``[B, C, 2 + T, H, W]`` (the call's workspace): frames
  0-1 are the streams' history (copied in), the producer writes the new chunk into frames 2.. and the conv
  reads the whole buffer (no ``cat``); then the last 2 frames become the streams' history (``state.Batch``;
  for one stream the norm kernel writes them there itself, as it writes the buffer);
* RMS norm + SiLU (+ the residual add of the previous block, whose sum is kept for the shortcut) is one
  pass (``fused_ops.rms_norm_silu``) that writes straight into the next conv's buffer;
* convolution biases are deferred to the pass that reads the conv's output next (cuDNN does not add a bias
  itself: PyTorch adds it in a separate pass over the output): the norm kernel, the residual sum, the copy
  into a downsampler's history, the upsamplers' interleaving copies. The residual stream is carried as
  ``Pending(x, add, bias)`` = x + add + bias until a layer needs it whole (``defer_bias=False``: as eager);
* the downsamplers' right/bottom zero padding is a zero-bordered buffer that the residual sum is written
  into; the temporal downsampler's last frame is the head of its own padded buffer;
* nearest x2 upsampling + 3x3 conv is one 3x3 conv with 4x the output channels on the low-resolution input
  (sub-pixel form: each output phase (a, b) sees a 2x2 window whose taps are sums of the original taps),
  then one interleaving copy; no upsampled intermediate (4x the input) is ever written;
* the RGB input and output convs are padded to 8 channels (aligned channels-last rows for cuDNN).

A stream keeps only its history tensors (``state.py``), so a call over several streams (their chunks stacked
on the batch dimension) costs each stream its history and no more; the buffers are the call's and are freed
(or, in a CUDA graph, reused) after it. The whole step is one CUDA graph per batch of streams (``accel.py``:
``accelerate: cuda_graph``).
The derived weights (sub-pixel, padded) are computed by ``install_fused``: call ``refresh()`` if the
module's weights change afterwards.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from typing import NamedTuple, Optional

from .fused_ops import rms_norm_silu

log = logging.getLogger(__name__)

CL3 = torch.channels_last_3d
RGB_PAD = 8  # channels of the padded RGB input / output convs

# Nearest x2 then a 3-tap kernel = per output phase a, a 3-tap kernel on the input whose taps are sums of the
# original ones: phase 0 sees rows (i-1, i, i) -> taps (k0, k1 + k2, 0); phase 1 sees (i, i, i+1) -> (0, k0 + k1, k2).
_SUBPIXEL = torch.tensor([[[1., 0., 0.], [0., 1., 1.], [0., 0., 0.]],
                          [[0., 0., 0.], [1., 1., 0.], [0., 0., 1.]]])  # [phase, new tap, old tap]


def subpixel_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv2d weights [Co, Ci, 3, 3] applied after nearest x2 upsampling -> [4 Co, Ci, 3, 3] applied before
    it, output channels ordered (row phase, column phase, Co); computed in float32."""
    r = _SUBPIXEL.to(weight.device)
    w = torch.einsum("aik,ockl,bjl->abocij", r, weight.float(), r)
    co = weight.shape[0]
    return (w.reshape(4 * co, *weight.shape[1:]).to(weight.dtype).contiguous(memory_format=torch.channels_last),
            bias.repeat(4))


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] channels-last 3-D -> [B*T, C, H, W] channels-last (a view)."""
    return x.transpose(1, 2).flatten(0, 1)


def _unframes(y: torch.Tensor, b: int) -> torch.Tensor:
    return y.unflatten(0, (b, -1)).transpose(1, 2)


OWN = object()  # _conv's default: the module's own bias


def _conv(conv: nn.Module, x: torch.Tensor, weight=None, bias=OWN) -> torch.Tensor:
    """``conv``'s convolution of ``x`` (its weight unless ``weight``; its bias unless ``bias``, None = none)."""
    fn = F.conv3d if x.dim() == 5 else F.conv2d
    return fn(x, conv.weight if weight is None else weight, conv.bias if bias is OWN else bias,
              conv.stride, conv.padding, conv.dilation, conv.groups)


class Pending(NamedTuple):
    """The residual stream not yet materialised: x + add + bias (each optional but x; bias per channel)."""
    x: torch.Tensor
    add: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def whole(self) -> bool:
        return self.add is None and self.bias is None


def _per_channel(bias: torch.Tensor, dims: int, channel_dim: int = 1) -> torch.Tensor:
    shape = [1] * dims
    shape[channel_dim] = -1
    return bias.view(shape)


class FusedWan:
    """The fused encode/decode steps of one ``WanVAE`` (see the module docstring)."""

    def __init__(self, vae, fuse_upsample: bool = True, pad_rgb: bool = True, norm_impl: str = "auto",
                 defer_bias: bool = True):
        from .wan_vae import Resample
        self.vae, self.fuse_upsample, self.pad_rgb = vae, fuse_upsample, pad_rgb
        self.norm_impl = norm_impl  # fused_ops.rms_norm_silu's impl: auto | triton | torch
        self.defer_bias = defer_bias
        self._upsamplers = [m for m in vae.decoder.modules() if isinstance(m, Resample) and m.mode.startswith("up")]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Channels-last weights (in place: one copy of the weights) and the derived ones."""
        for m in self.vae.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=CL3)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        self.subpixel = {id(m): subpixel_weights(m.resample[1].weight, m.resample[1].bias) for m in self._upsamplers}
        from .wan_vae import ResidualBlock   # a residual block's two deferred biases, summed once
        self.block_bias = {id(m): m.residual[6].bias + (m.shortcut.bias if isinstance(m.shortcut, nn.Conv3d) else 0)
                           for m in self.vae.modules() if isinstance(m, ResidualBlock)}
        c_in, head = self.vae.encoder.conv1, self.vae.decoder.head[2]
        self.rgb_in = self.rgb_out = None
        if self.pad_rgb:
            w = c_in.weight.new_zeros(c_in.weight.shape[0], RGB_PAD, *c_in.weight.shape[2:])
            w[:, :3] = c_in.weight
            self.rgb_in = w.contiguous(memory_format=CL3)
            w = head.weight.new_zeros(RGB_PAD, *head.weight.shape[1:])
            w[:3] = head.weight
            b = head.bias.new_zeros(RGB_PAD)
            b[:3] = head.bias
            self.rgb_out = (w.contiguous(memory_format=CL3), b)

    # ------------------------------------------------------------------ the two steps
    def encode_step(self, x: torch.Tensor, cache) -> torch.Tensor:
        vae, enc = self.vae, self.vae.encoder
        assert not cache.first, "the fused path runs after a stream's first call"
        conv = enc.conv1
        buf = self._padded(cache, conv.slot, x, 2, channels=RGB_PAD if self.pad_rgb else 3)
        buf[:, :3, 2:].copy_(x)
        p = self._conv_out(conv, buf, self.rgb_in)
        self._keep(cache, conv.slot, buf, 3, x.shape[2], 2)
        for layer in (*enc.downsamples, *enc.middle):
            p = self._layer(layer, p, cache)
        h = self._norm_conv(enc.head[0], enc.head[2], p, cache, defer=False).x
        return F.conv3d(h, vae.conv1.weight[: vae.z_dim], vae.conv1.bias[: vae.z_dim])  # mu only

    def decode_step(self, z: torch.Tensor, cache) -> torch.Tensor:
        vae, dec = self.vae, self.vae.decoder
        assert not cache.first, "the fused path runs after a stream's first call"
        x = _conv(vae.conv2, z.contiguous(memory_format=CL3))
        conv = dec.conv1
        buf = self._padded(cache, conv.slot, x, 2)
        buf[:, :, 2:].copy_(x)
        p = self._conv_out(conv, buf)
        self._keep(cache, conv.slot, buf, x.shape[1], x.shape[2], 2)
        for layer in (*dec.middle, *dec.upsamples):
            p = self._layer(layer, p, cache)
        if self.pad_rgb:
            return self._norm_conv(dec.head[0], dec.head[2], p, cache, *self.rgb_out, defer=False).x[:, :3]
        return self._norm_conv(dec.head[0], dec.head[2], p, cache, defer=False).x

    # ------------------------------------------------------------------ layers
    def _layer(self, layer, p: Pending, cache) -> Pending:
        from .wan_vae import AttentionBlock, Resample, ResidualBlock
        if isinstance(layer, ResidualBlock):
            return self._residual(layer, p, cache)
        if isinstance(layer, AttentionBlock):  # 60x104 at 480x832: small; eager, channels-last views
            return Pending(layer(self._sum(p)))
        if isinstance(layer, Resample):
            return (self._down if layer.mode.startswith("down") else self._up)(layer, p, cache)
        raise TypeError(f"no fused form for {type(layer).__name__}")

    def _conv_out(self, conv, x, weight=None, bias=OWN) -> Pending:
        """A conv's output, its bias deferred (or added, with ``defer_bias=False``)."""
        b = conv.bias if bias is OWN else bias
        if not self.defer_bias or b is None:
            return Pending(_conv(conv, x, weight, b))
        return Pending(_conv(conv, x, weight, None), None, b)

    def _residual(self, blk, p: Pending, cache) -> Pending:
        r = blk.residual
        x = p.x if p.whole else torch.empty_like(p.x, memory_format=CL3)  # the block input, for the shortcut
        h = self._norm_conv(r[0], r[2], p, cache, sum_out=None if p.whole else x)
        h = self._norm_conv(r[3], r[6], h, cache)  # r[5] is a p=0 dropout
        if not self.defer_bias:
            return Pending(h.x, blk.shortcut(x))
        shortcut = x if isinstance(blk.shortcut, nn.Identity) else _conv(blk.shortcut, x, bias=None)
        return Pending(h.x, shortcut, self.block_bias[id(blk)])

    def _norm_conv(self, norm, conv, p: Pending, cache, weight=None, bias=OWN, sum_out=None, defer=True) -> Pending:
        """conv(silu(norm(x + add + bias))) with the norm written into the conv's padded history buffer."""
        x, L = p.x, conv.lookback
        buf = self._padded(cache, conv.slot, x, L)
        # one stream, a chunk at least as long as the history: the norm writes the new history itself
        hist = cache.sole_history(conv.slot) if x.shape[2] >= L else None
        tail = hist if hist is not None and hist.shape == (x.shape[0], x.shape[1], L, *x.shape[3:]) else None
        rms_norm_silu(x, norm.gamma, add=p.add, bias=p.bias, out=buf[:, :, L:], sum_out=sum_out, tail=tail,
                      impl=self.norm_impl)
        y = self._conv_out(conv, buf, weight, bias) if defer else Pending(_conv(conv, buf, weight, bias))
        if tail is None:
            self._keep(cache, conv.slot, buf, x.shape[1], x.shape[2], L)
        return y

    def _down(self, layer, p: Pending, cache) -> Pending:
        b, c, t, h, w = p.x.shape
        padded = torch.empty((b, c, t, h + 1, w + 1), dtype=p.x.dtype, device=p.x.device, memory_format=CL3)
        padded[..., h, :].zero_()  # ZeroPad2d((0, 1, 0, 1)): the bottom row and the right column
        padded[..., :h, w].zero_()
        self._sum(p, out=padded[..., :h, :w])
        y = self._conv_out(layer.resample[1], _frames(padded))
        y = Pending(_unframes(y.x, b), None, y.bias)
        if layer.mode == "downsample3d":  # stride-2 time conv over (last frame of the previous chunk, chunk)
            buf = self._padded(cache, layer.slot, y.x, 1)
            self._sum(y, out=buf[:, :, 1:])   # the history holds whole frames, as eager's
            self._keep(cache, layer.slot, buf, c, t, 1)
            y = self._conv_out(layer.time_conv, buf)
        return y

    def _up(self, layer, p: Pending, cache) -> Pending:
        if layer.mode == "upsample3d":  # time conv to 2C channels = (even, odd) output frames
            b, c, t, h, w = p.x.shape
            conv = layer.time_conv
            buf = self._padded(cache, conv.slot, p.x, 2)
            self._sum(p, out=buf[:, :, 2:])
            y = self._conv_out(conv, buf)
            self._keep(cache, conv.slot, buf, c, t, 2)
            x = torch.empty((b, c, 2 * t, h, w), dtype=y.x.dtype, device=y.x.device, memory_format=CL3)
            pairs = y.x.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5)           # [b, c, t, 2, h, w]
            _copy_plus(x.unflatten(2, (t, 2)), pairs, None if y.bias is None else
                       y.bias.view(2, c).t().reshape(1, c, 1, 2, 1, 1))      # the interleave adds the bias
        else:
            x = self._sum(p)
        f = _frames(x)
        conv = layer.resample[1]
        if not self.fuse_upsample:
            return Pending(_unframes(conv(F.interpolate(f, scale_factor=2.0, mode="nearest-exact")), x.shape[0]))
        weight, bias = self.subpixel[id(layer)]
        y = F.conv2d(f, weight, None if self.defer_bias else bias, padding=1)  # [N, (a, b, Co), h, w]
        n, _, h, w = f.shape
        co = weight.shape[0] // 4
        out = torch.empty((n, co, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        _copy_plus(out.unflatten(2, (h, 2)).unflatten(4, (w, 2)), y.unflatten(1, (2, 2, co)).permute(0, 3, 4, 1, 5, 2),
                   _per_channel(conv.bias, 6) if self.defer_bias else None)   # the interleave adds the bias
        return Pending(_unframes(out, x.shape[0]))

    @staticmethod
    def _sum(p: Pending, out=None):
        """x + add + bias, whole (into ``out`` if given)."""
        if p.whole:
            return p.x if out is None else out.copy_(p.x)
        if p.bias is None:
            return torch.add(p.x, p.add) if out is None else torch.add(p.x, p.add, out=out)
        bias = _per_channel(p.bias, p.x.dim())
        if p.add is None:
            return torch.add(p.x, bias) if out is None else torch.add(p.x, bias, out=out)
        s = torch.add(p.x, p.add) if out is None else torch.add(p.x, p.add, out=out)
        return s.add_(bias)

    # ------------------------------------------------------------------ the streams' history in and out
    @staticmethod
    def _padded(cache, slot, x: torch.Tensor, lookback: int, channels=None) -> torch.Tensor:
        """A padded input buffer [B, C', lookback + T, H, W] for ``x``'s frames (written by the caller) whose
        head holds the streams' history of ``slot``; channels beyond ``x``'s (RGB padding) are zero."""
        b, c, t, h, w = x.shape
        buf = torch.empty((b, channels or c, lookback + t, h, w), dtype=x.dtype, device=x.device, memory_format=CL3)
        if channels and channels > c:
            buf[:, c:].zero_()
        cache.read(slot, buf[:, :c, :lookback], x, lookback)
        return buf

    @staticmethod
    def _keep(cache, slot, buf: torch.Tensor, c: int, t: int, lookback: int) -> None:
        """The buffer's last ``lookback`` frames (of its first ``c`` channels) become the streams' history."""
        cache.keep(slot, buf[:, :c, t:t + lookback])


def _copy_plus(out: torch.Tensor, src: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """out = src (+ bias, broadcast): one pass either way."""
    if bias is None:
        out.copy_(src)
    else:
        torch.add(src, bias, out=out)


def install_fused(vae, **options):
    """Replace ``vae._steps`` (a ``WanVAE``) by the fused steps; returns ``vae``. Call after the weights are
    loaded and the module is on its device, and before ``accel.accelerate_vae``."""
    fused = FusedWan(vae, **options)
    vae.fused = fused
    vae._steps = {"encode": fused.encode_step, "decode": fused.decode_step}
    return vae
