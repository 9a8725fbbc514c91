"""One-pass RMS norm + SiLU (+ residual add) for the Wan VAE's fused path (``wan_fused.py``).

    y = silu(s / max(||s||_C, 1e-12) * sqrt(C) * gamma),  s = x (+ add) (+ bias)

over dim 1 of ``[B, C, T, H, W]`` tensors: the reference's ``RMS_norm`` (``F.normalize`` over channels) then
``SiLU``, as in every residual block and head. ``out`` may be any strided view with unit channel stride
(the tail of a conv's padded history buffer, so that the conv reads it with no ``cat``); ``sum_out``
receives ``s`` (the residual stream, rounded to the activation dtype first, as eager materialises it).
``bias`` ([C]) is the bias of the conv that produced ``x`` (and ``add``), deferred to this pass: cuDNN does
not add biases, so PyTorch would spend a whole pass over the conv output on it. ``tail`` [B, C, L, H, W]
receives a copy of the output's last L frames as they are written (a stream's causal history: the copy
after the conv then has nothing to do).

On CUDA with Triton this is one kernel: each program takes a tile of rows (one row = the C channels of one
(b, t, h, w) position, contiguous in channels-last memory) and reads x (and add) once, writes y (and s)
once, all arithmetic in float32. Elsewhere (CPU, no Triton, a layout the kernel does not take) the same
formula runs as torch ops in float32: the CPU reference, tested against float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

EPS = 1e-12  # F.normalize's
_ELEMS_PER_PROGRAM = 8192  # tile size: ~16 KB of bf16 per operand per program, 8 warps


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, *, add: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                  sum_out: Optional[torch.Tensor] = None, tail: Optional[torch.Tensor] = None,
                  silu: bool = True, impl: str = "auto") -> torch.Tensor:
    """Normalise ``x (+ add) (+ bias)`` over channels, scale by ``sqrt(C) * gamma``, apply SiLU; write into
    ``out`` (allocated channels-last if None) and return it. ``impl``: auto (Triton on CUDA) | triton | torch."""
    if x.dim() != 5:
        raise ValueError(f"rms_norm_silu takes [B, C, T, H, W], got {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    for t in (add, out, sum_out):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(x.shape)}")
    if bias is not None and bias.numel() != x.shape[1]:
        raise ValueError(f"bias has {bias.numel()} values for {x.shape[1]} channels")
    if tail is not None and (tail.shape[:2] != x.shape[:2] or tail.shape[3:] != x.shape[3:]
                             or not 0 < tail.shape[2] <= x.shape[2]):
        raise ValueError(f"tail {tuple(tail.shape)} cannot hold the last frames of {tuple(x.shape)}")
    tail_from = x.shape[2] - tail.shape[2] if tail is not None else 0
    if impl == "auto":
        impl = "triton" if triton_ok(x, add, out, sum_out, tail) else "torch"
    if impl == "triton":
        _rms_norm_silu_triton(x, gamma, add, bias, out, sum_out, tail, tail_from, silu)
    elif impl == "torch":
        _rms_norm_silu_torch(x, gamma, add, bias, out, sum_out, silu)
        if tail is not None:
            tail.copy_(out[:, :, tail_from:tail_from + tail.shape[2]])
    else:
        raise ValueError(f"unknown impl {impl!r}; valid: auto, triton, torch")
    return out


def triton_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Triton takes CUDA tensors whose (T, H, W) dims collapse into one strided row index (fast when the
    channels are contiguous: channels-last tensors and the tails of padded buffers)."""
    ts = [t for t in tensors if t is not None]
    return triton is not None and all(t.is_cuda and _row_strides(t) is not None for t in ts)


def _row_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(batch, row, channel) strides of [B, C, T, H, W] viewed as B x (T*H*W rows) x C, or None when the
    T, H, W dims do not collapse into one strided index."""
    row = None
    for size, stride in sorted(((t.shape[i], t.stride(i)) for i in (4, 3, 2) if t.shape[i] > 1), key=lambda p: p[1]):
        if row is None:
            row, expect = stride, stride * size
        elif stride != expect:
            return None
        else:
            expect = stride * size
    return t.stride(0), 1 if row is None else row, t.stride(1)


def _rms_norm_silu_torch(x, gamma, add, bias, out, sum_out, silu):
    s = x if add is None else x + add  # in the activation dtype, as eager
    if bias is not None:
        s = s + bias.to(s.dtype).reshape(1, -1, 1, 1, 1)
    if sum_out is not None:
        sum_out.copy_(s)
    v = s.float()
    y = v / v.norm(dim=1, keepdim=True).clamp_min(EPS) * (gamma.float().reshape(1, -1, 1, 1, 1) * math.sqrt(v.shape[1]))
    out.copy_(F.silu(y) if silu else y)


def _rms_norm_silu_triton(x, gamma, add, bias, out, sum_out, tail, tail_from, silu):
    B, C, T, H, W = x.shape
    n = T * H * W
    if B * n == 0:
        return
    strides = [_row_strides(t if t is not None else x) for t in (x, add, out, sum_out, tail)]
    if any(s is None for s in strides):
        raise ValueError("rms_norm_silu(impl='triton'): an operand's T, H, W dims do not collapse into rows")
    block_c = triton.next_power_of_2(C)
    block_r = max(1, _ELEMS_PER_PROGRAM // block_c)
    _rms_silu_kernel[(triton.cdiv(B * n, block_r),)](
        x, x if add is None else add, gamma.reshape(-1).contiguous(), gamma if bias is None else bias.contiguous(),
        out, x if sum_out is None else sum_out, x if tail is None else tail,
        B * n, n, C, tail_from * H * W, *(v for s in strides for v in s), math.sqrt(C), EPS,
        HAS_ADD=add is not None, HAS_BIAS=bias is not None, HAS_SUM=sum_out is not None, HAS_TAIL=tail is not None,
        SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 8192 else 4)


if triton is not None:
    @triton.jit
    def _rms_silu_kernel(x_ptr, a_ptr, g_ptr, b_ptr, y_ptr, s_ptr, t_ptr, R, N, C, T0,
                         xsb, xsr, xsc, asb, asr, asc, ysb, ysr, ysc, ssb, ssr, ssc, tsb, tsr, tsc,
                         scale, eps, HAS_ADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SUM: tl.constexpr,
                         HAS_TAIL: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Row r = (b, n): batch b = r // N, row n of T*H*W (channels-last memory order). 32-bit index math,
        # 64-bit offsets. Channel strides are 1 in channels-last tensors: Triton specialises on that and on
        # strides divisible by 16, which gives 16-byte loads and stores.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        b = (rows // N).to(tl.int64)
        n = (rows % N).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < R)[:, None] & cmask[None, :]
        c64 = cols.to(tl.int64)[None, :]
        v = tl.load(x_ptr + (b * xsb + n * xsr)[:, None] + c64 * xsc, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            v += tl.load(a_ptr + (b * asb + n * asr)[:, None] + c64 * asc, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # the producing conv's bias, per channel
            v += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_ADD or HAS_BIAS:
            v = v.to(x_ptr.dtype.element_ty).to(tl.float32)  # the residual stream is stored in x's dtype
        if HAS_SUM:
            tl.store(s_ptr + (b * ssb + n * ssr)[:, None] + c64 * ssc, v.to(s_ptr.dtype.element_ty), mask=mask)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), eps)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        y = v * inv[:, None] * g[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + (b * ysb + n * ysr)[:, None] + c64 * ysc, y.to(y_ptr.dtype.element_ty), mask=mask)
        if HAS_TAIL:  # rows from frame tail_from on (T0 = tail_from * H * W) also go to the stream's history
            tmask = mask & (n >= T0)[:, None]
            tl.store(t_ptr + (b * tsb + (n - T0) * tsr)[:, None] + c64 * tsc, y.to(t_ptr.dtype.element_ty), mask=tmask)
