"""One-pass RMS norm + SiLU (+ residual add) for the Wan VAE's fused path (``wan_fused.py``).

    y = silu(s / max(||s||_C, 1e-12) * sqrt(C) * gamma),  s = x (+ add)

over dim 1 of ``[B, C, T, H, W]`` tensors: the reference's ``RMS_norm`` (``F.normalize`` over channels) then
``SiLU``, as in every residual block and head. ``out`` may be any strided view with unit channel stride
(the tail of a conv's padded history buffer, so that the conv reads it with no ``cat``); ``sum_out``
receives ``s`` (the residual stream, rounded to the activation dtype first, as eager materialises it).

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
                  out: Optional[torch.Tensor] = None, sum_out: Optional[torch.Tensor] = None,
                  silu: bool = True, impl: str = "auto") -> torch.Tensor:
    """Normalise ``x (+ add)`` over channels, scale by ``sqrt(C) * gamma``, apply SiLU; write into ``out``
    (allocated channels-last if None) and return it. ``impl``: auto (Triton on CUDA) | triton | torch."""
    if x.dim() != 5:
        raise ValueError(f"rms_norm_silu takes [B, C, T, H, W], got {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    for t in (add, out, sum_out):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(x.shape)}")
    if impl == "auto":
        impl = "triton" if triton_ok(x, add, out, sum_out) else "torch"
    if impl == "triton":
        _rms_norm_silu_triton(x, gamma, add, out, sum_out, silu)
    elif impl == "torch":
        _rms_norm_silu_torch(x, gamma, add, out, sum_out, silu)
    else:
        raise ValueError(f"unknown impl {impl!r}; valid: auto, triton, torch")
    return out


def triton_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Triton takes CUDA tensors of any strides (fast when channels are contiguous: channels-last)."""
    return triton is not None and all(t.is_cuda for t in tensors if t is not None)


def _rms_norm_silu_torch(x, gamma, add, out, sum_out, silu):
    s = x if add is None else x + add  # in the activation dtype, as eager
    if sum_out is not None:
        sum_out.copy_(s)
    v = s.float()
    y = v / v.norm(dim=1, keepdim=True).clamp_min(EPS) * (gamma.float().reshape(1, -1, 1, 1, 1) * math.sqrt(v.shape[1]))
    out.copy_(F.silu(y) if silu else y)


def _rms_norm_silu_triton(x, gamma, add, out, sum_out, silu):
    B, C, T, H, W = x.shape
    rows = B * T * H * W
    if rows == 0:
        return
    block_c = triton.next_power_of_2(C)
    block_r = max(1, _ELEMS_PER_PROGRAM // block_c)

    def strides(t):  # (b, t, h, w, c) strides of a tensor; unused operands get x's (never read or written)
        s = (x if t is None else t).stride()
        return s[0], s[2], s[3], s[4], s[1]

    g = gamma.reshape(-1).contiguous()
    _rms_silu_kernel[(triton.cdiv(rows, block_r),)](
        x, x if add is None else add, g, out, x if sum_out is None else sum_out,
        rows, T, H, W, C, *strides(x), *strides(add), *strides(out), *strides(sum_out),
        math.sqrt(C), EPS,
        HAS_ADD=add is not None, HAS_SUM=sum_out is not None, SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 8192 else 4)


if triton is not None:
    @triton.jit
    def _rms_silu_kernel(x_ptr, a_ptr, g_ptr, y_ptr, s_ptr, R, T, H, W, C,
                         xs0, xs1, xs2, xs3, xsc, as0, as1, as2, as3, asc, ys0, ys1, ys2, ys3, ysc,
                         ss0, ss1, ss2, ss3, ssc,
                         scale, eps, HAS_ADD: tl.constexpr, HAS_SUM: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # rows in (b, t, h, w) order = channels-last memory order; 64-bit offsets (activations > 2^31 bytes).
        # The channel strides (*sc) are 1 in channels-last tensors; Triton specialises on that (16-byte loads).
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        w = rows % W
        q = rows // W
        h = q % H
        q = q // H
        t = q % T
        b = q // T
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = (rows < R)[:, None] & cmask[None, :]
        xo = (b * xs0 + t * xs1 + h * xs2 + w * xs3)[:, None] + cols[None, :] * xsc
        v = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            ao = (b * as0 + t * as1 + h * as2 + w * as3)[:, None] + cols[None, :] * asc
            v += tl.load(a_ptr + ao, mask=mask, other=0.0).to(tl.float32)
            v = v.to(x_ptr.dtype.element_ty).to(tl.float32)  # the residual stream is stored in x's dtype
        if HAS_SUM:
            so = (b * ss0 + t * ss1 + h * ss2 + w * ss3)[:, None] + cols[None, :] * ssc
            tl.store(s_ptr + so, v.to(s_ptr.dtype.element_ty), mask=mask)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), eps)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * scale
        y = v * inv[:, None] * g[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        yo = (b * ys0 + t * ys1 + h * ys2 + w * ys3)[:, None] + cols[None, :] * ysc
        tl.store(y_ptr + yo, y.to(y_ptr.dtype.element_ty), mask=mask)
