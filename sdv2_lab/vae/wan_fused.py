"""The Wan VAE's steady-state encode and decode as few, large passes: the "fused" path (``vae.fused``).

The eager module (``wan_vae.py``) stays the numerical reference and runs every stream's first call (frame 0
/ latent 0 alone). After that ``install_fused`` replaces its two steps (``vae._steps``) by these, which
compute the same function of the same weights with less memory traffic between the convolutions:

* channels-last 3-D activations end to end (weights converted once, in place), so cuDNN runs its fast NHWC
  kernels and per-frame 2-D ops see plain views (no layout copies between layers);
* every causal 3-tap conv reads one padded input buffer ``[B, C, 2 + T, H, W]`` (the call's workspace): frames
  0-1 are the streams' history (copied in), the producer writes the new chunk into frames 2.. and the conv
  reads the whole buffer (no ``cat``); then the last 2 frames become the streams' history (``state.Batch``);
* RMS norm + SiLU (+ the residual add of the previous block, whose sum is kept for the shortcut) is one
  pass (``fused_ops.rms_norm_silu``) that writes straight into the next conv's buffer;
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


def _conv(conv: nn.Module, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    fn = F.conv3d if x.dim() == 5 else F.conv2d
    return fn(x, conv.weight if weight is None else weight, conv.bias if bias is None else bias,
              conv.stride, conv.padding, conv.dilation, conv.groups)


class FusedWan:
    """The fused encode/decode steps of one ``WanVAE`` (see the module docstring)."""

    def __init__(self, vae, fuse_upsample: bool = True, pad_rgb: bool = True, norm_impl: str = "auto"):
        from .wan_vae import Resample
        self.vae, self.fuse_upsample, self.pad_rgb = vae, fuse_upsample, pad_rgb
        self.norm_impl = norm_impl  # fused_ops.rms_norm_silu's impl: auto | triton | torch
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
        h = _conv(conv, buf, self.rgb_in)
        self._keep(cache, conv.slot, buf, 3, x.shape[2], 2)
        p = (h, None)  # pending residual stream: p[0] + p[1]
        for layer in (*enc.downsamples, *enc.middle):
            p = self._layer(layer, p, cache)
        h = self._norm_conv(enc.head[0], enc.head[2], p, cache)
        return F.conv3d(h, vae.conv1.weight[: vae.z_dim], vae.conv1.bias[: vae.z_dim])  # mu only

    def decode_step(self, z: torch.Tensor, cache) -> torch.Tensor:
        vae, dec = self.vae, self.vae.decoder
        assert not cache.first, "the fused path runs after a stream's first call"
        x = _conv(vae.conv2, z.contiguous(memory_format=CL3))
        conv = dec.conv1
        buf = self._padded(cache, conv.slot, x, 2)
        buf[:, :, 2:].copy_(x)
        h = _conv(conv, buf)
        self._keep(cache, conv.slot, buf, x.shape[1], x.shape[2], 2)
        p = (h, None)
        for layer in (*dec.middle, *dec.upsamples):
            p = self._layer(layer, p, cache)
        if self.pad_rgb:
            return self._norm_conv(dec.head[0], dec.head[2], p, cache, *self.rgb_out)[:, :3]
        return self._norm_conv(dec.head[0], dec.head[2], p, cache)

    # ------------------------------------------------------------------ layers
    def _layer(self, layer, p, cache):
        from .wan_vae import AttentionBlock, Resample, ResidualBlock
        if isinstance(layer, ResidualBlock):
            return self._residual(layer, p, cache)
        if isinstance(layer, AttentionBlock):  # 60x104 at 480x832: small; eager, channels-last views
            return layer(self._sum(p)), None
        if isinstance(layer, Resample):
            return (self._down if layer.mode.startswith("down") else self._up)(layer, p, cache), None
        raise TypeError(f"no fused form for {type(layer).__name__}")

    def _residual(self, blk, p, cache):
        r = blk.residual
        x = p[0] if p[1] is None else torch.empty_like(p[0], memory_format=CL3)  # the block input, for the shortcut
        h = self._norm_conv(r[0], r[2], p, cache, sum_out=None if p[1] is None else x)
        h = self._norm_conv(r[3], r[6], (h, None), cache)  # r[5] is a p=0 dropout
        return h, blk.shortcut(x)

    def _norm_conv(self, norm, conv, p, cache, weight=None, bias=None, sum_out=None):
        """conv(silu(norm(p[0] + p[1]))) with the norm written into the conv's padded history buffer."""
        x = p[0]
        buf = self._padded(cache, conv.slot, x, conv.lookback)
        rms_norm_silu(x, norm.gamma, add=p[1], out=buf[:, :, conv.lookback:], sum_out=sum_out, impl=self.norm_impl)
        y = _conv(conv, buf, weight, bias)
        self._keep(cache, conv.slot, buf, x.shape[1], x.shape[2], conv.lookback)
        return y

    def _down(self, layer, p, cache):
        b, c, t, h, w = p[0].shape
        padded = torch.empty((b, c, t, h + 1, w + 1), dtype=p[0].dtype, device=p[0].device, memory_format=CL3)
        padded[..., h, :].zero_()  # ZeroPad2d((0, 1, 0, 1)): the bottom row and the right column
        padded[..., :h, w].zero_()
        self._sum(p, out=padded[..., :h, :w])
        y = _unframes(_conv(layer.resample[1], _frames(padded)), b)
        if layer.mode == "downsample3d":  # stride-2 time conv over (last frame of the previous chunk, chunk)
            buf = self._padded(cache, layer.slot, y, 1)
            buf[:, :, 1:].copy_(y)
            self._keep(cache, layer.slot, buf, y.shape[1], t, 1)
            y = _conv(layer.time_conv, buf)
        return y

    def _up(self, layer, p, cache):
        if layer.mode == "upsample3d":  # time conv to 2C channels = (even, odd) output frames
            b, c, t, h, w = p[0].shape
            conv = layer.time_conv
            buf = self._padded(cache, conv.slot, p[0], 2)
            self._sum(p, out=buf[:, :, 2:])
            y = _conv(conv, buf)
            self._keep(cache, conv.slot, buf, c, t, 2)
            x = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=CL3)
            x.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5))
        else:
            x = self._sum(p)
        f = _frames(x)
        conv = layer.resample[1]
        if not self.fuse_upsample:
            return _unframes(conv(F.interpolate(f, scale_factor=2.0, mode="nearest-exact")), x.shape[0])
        weight, bias = self.subpixel[id(layer)]
        y = F.conv2d(f, weight, bias, padding=1)  # [N, (a, b, Co), h, w]
        n, _, h, w = f.shape
        co = weight.shape[0] // 4
        out = torch.empty((n, co, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        out.unflatten(2, (h, 2)).unflatten(4, (w, 2)).copy_(y.unflatten(1, (2, 2, co)).permute(0, 3, 4, 1, 5, 2))
        return _unframes(out, x.shape[0])

    @staticmethod
    def _sum(p, out=None):
        if p[1] is None:
            return p[0] if out is None else out.copy_(p[0])
        return torch.add(p[0], p[1]) if out is None else torch.add(p[0], p[1], out=out)

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


def install_fused(vae, **options):
    """Replace ``vae._steps`` (a ``WanVAE``) by the fused steps; returns ``vae``. Call after the weights are
    loaded and the module is on its device, and before ``accel.accelerate_vae``."""
    fused = FusedWan(vae, **options)
    vae.fused = fused
    vae._steps = {"encode": fused.encode_step, "decode": fused.decode_step}
    return vae
