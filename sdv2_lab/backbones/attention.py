"""Attention backends behind one interface, chosen by name (``conf/attention/``).

Every backend takes ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` (the flash-attn layout, which is also the
layout of the KV cache) and an optional per-row key length ``kv_lens [B]`` (int tensor on the device; keys at
or beyond it are ignored), and an optional additive key bias ``key_bias [B, Lk]`` (float32, added to every
query's score of that key: Krea's KV attention bias; backends registered with ``takes_key_bias``). No causal mask:
a streaming chunk sees itself and the whole valid cache, positions live in the RoPE phases (reference.md §1.7).
Returns ``[B, Lq, H, D]`` in q's dtype.

A backend is registered with ``@register_attention(name)``; ``get_attention(name)`` fails with the list of
backends that work on this machine.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from ..registry import Registry

AttendFn = Callable[..., torch.Tensor]   # (q, k, v, kv_lens=None, key_bias=None) -> [B, Lq, H, D]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    attend: AttendFn
    available: Callable[[], Optional[str]]  # None when usable, else the reason it is not
    description: str = ""
    takes_key_bias: bool = False            # whether ``attend`` takes ``key_bias`` (Krea's KV attention bias)


ATTENTION: Registry[AttentionBackend] = Registry("attention backend")


def register_attention(name: str, available: Callable[[], Optional[str]] = lambda: None, description: str = "",
                       takes_key_bias: bool = False):
    def wrap(fn: AttendFn) -> AttendFn:
        ATTENTION.register(name)(AttentionBackend(name, fn, available, description, takes_key_bias))
        return fn
    return wrap


def available_attention_backends() -> list[str]:
    return [n for n in ATTENTION if ATTENTION.get(n).available() is None]


def get_attention(name: str) -> AttentionBackend:
    if name not in ATTENTION:
        raise ValueError(f"unknown attention backend {name!r}; known: {ATTENTION.names()}; "
                         f"usable on this machine: {available_attention_backends()}")
    backend = ATTENTION.get(name)
    reason = backend.available()
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} is not usable here ({reason}); "
                           f"usable on this machine: {available_attention_backends()}")
    return backend


def _key_mask(kv_lens: torch.Tensor, lk: int) -> torch.Tensor:
    """[B] lengths -> boolean [B, 1, 1, Lk] mask (True = attend)."""
    return (torch.arange(lk, device=kv_lens.device)[None, :] < kv_lens[:, None])[:, None, None, :]


# SDPA's kernels by name. On CUDA each call sets SDPA's priority order (torch's default tries flash, then
# efficient, then math, and never reaches cuDNN); a kernel that cannot run a call (flash with a key mask, say)
# passes it to the next. Measured at the cache shapes on an H200 (experiments/results/attention_h200.md): cuDNN
# runs self-attention 1.7x faster than flash (585 vs 340 TFLOP/s at 14B) and is the fastest or within 10% on
# cross-attention.
# Inside a CUDA-graph capture: cuDNN builds a plan at the first call of a shape, which a capture cannot contain
# (the capture is invalidated), but a capture after an eager call of the same shape keeps cuDNN. Every graph here
# is made that way (graph_cache.GraphCache: a key's first call eager, its second captured), so captures use the
# same order (H100, 1.3B DiT step in a graph: 125.7 DiT FPS with cuDNN, 106.5 with flash; experiments/results/
# 2026-12-07_h100_session2). A graph of one's own at an unseen shape: SDV2_SDPA_CAPTURE=flash (torch's order).
SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
SDPA_CUDA_ORDER = ("cudnn", "flash", "efficient", "math")
TORCH_ORDER = ("flash", "efficient", "math", "cudnn")  # torch's default; cuDNN last (never reached)


def capture_order(setting: Optional[str]) -> tuple:
    """The order while capturing, from ``SDV2_SDPA_CAPTURE``: unset or ``cudnn`` = SDPA_CUDA_ORDER, ``flash`` =
    torch's default."""
    orders = {None: SDPA_CUDA_ORDER, "": SDPA_CUDA_ORDER, "cudnn": SDPA_CUDA_ORDER, "flash": TORCH_ORDER}
    if setting not in orders:
        raise ValueError(f"SDV2_SDPA_CAPTURE={setting!r}: expected cudnn (the default) or flash")
    return orders[setting]


SDPA_CAPTURE_ORDER = capture_order(os.environ.get("SDV2_SDPA_CAPTURE"))


def sdpa_order(first: Optional[str] = None, base: tuple = SDPA_CUDA_ORDER) -> list[SDPBackend]:
    names = ([first] if first else []) + [n for n in base if n != first]
    return [SDPA_KERNELS[n] for n in names]


def _priority(order: list[SDPBackend]) -> list[int]:
    """A full priority list for torch: ``order`` first, then the backends it leaves out (overrideable)."""
    ints = [int(b) for b in order]
    return ints + [b for b in torch._C._get_sdp_priority_order() if b not in ints]


def with_sdpa_priority(priority: list[int], fn):
    """fn() under SDPA priority ``priority``, restored after. Only the order changes: an enclosing
    ``sdpa_kernel`` that disables kernels still holds. ~1 us of host time (the ``sdpa_kernel`` context: ~15)."""
    previous = torch._C._get_sdp_priority_order()
    torch._C._set_sdp_priority_order(priority)
    try:
        return fn()
    finally:
        torch._C._set_sdp_priority_order(previous)


def refuse_key_bias(name: str, key_bias) -> None:
    """A backend without a key bias, given one (switched to after the cache was built)."""
    if key_bias is not None:
        raise ValueError(f"attention={name} takes no key bias: kv_attention_bias < 1 (Krea's) needs attention=sdpa "
                         f"or flex")


def _sdpa(q, k, v, kv_lens=None, key_bias=None, order=None, capture_order=None):
    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # CPU half-precision SDPA is slow and less accurate; the reference also upcasts here.
        q, k, v = q.float(), k.float(), v.float()
    mask = None if kv_lens is None else _key_mask(kv_lens, k.shape[2])
    if key_bias is not None:   # an additive mask: the bias, and -inf past each row's length
        bias = key_bias.to(q.dtype)[:, None, None, :]
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    if q.device.type == "cuda":
        priority = capture_order if torch.cuda.is_current_stream_capturing() else order
        out = with_sdpa_priority(priority, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).to(out_dtype)


def _sdpa_backend(first: Optional[str] = None):
    # cuDNN first while capturing only where the capture order allows it (see SDPA_CAPTURE_ORDER)
    capture_first = None if first == "cudnn" and SDPA_CAPTURE_ORDER[0] != "cudnn" else first
    return functools.partial(_sdpa, order=_priority(sdpa_order(first)),
                             capture_order=_priority(sdpa_order(capture_first, SDPA_CAPTURE_ORDER)))


sdpa_attention = register_attention(
    "sdpa", description=f"torch scaled_dot_product_attention; on CUDA kernels tried in the order {SDPA_CUDA_ORDER}",
    takes_key_bias=True)(_sdpa_backend())


def _cuda_available() -> Optional[str]:
    return None if torch.cuda.is_available() else "needs a CUDA device"


for _name in ("cudnn", "flash", "efficient"):  # one SDPA kernel first, for sweeps and benchmarks
    register_attention(f"sdpa_{_name}", available=_cuda_available, takes_key_bias=True,
                       description=f"torch SDPA with the {_name} kernel first (CUDA)")(_sdpa_backend(_name))


def _flex_available() -> Optional[str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return f"torch.nn.attention.flex_attention missing: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # One compile per shape (rows x query x key lengths): a stream and a benchmark see more than dynamo's 8.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, 64) < 64:
            setattr(dynamo_config, name, 64)
    return torch.compile(flex_attention, dynamic=False)


def _add_key_bias(bias: torch.Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]
    return score_mod


@register_attention("flex", available=_flex_available, description="torch FlexAttention (compiled on GPU)",
                    takes_key_bias=True)
def flex_attention_backend(q, k, v, kv_lens=None, key_bias=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
        fn = flex_attention  # eager reference path; the compiled one targets GPUs
    else:
        fn = _compiled_flex()
    block_mask = None
    if kv_lens is not None:
        lens = kv_lens

        def valid(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        block_mask = create_block_mask(valid, B=q.shape[0], H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2],
                                       device=q.device)
    out = fn(q, k, v, score_mod=None if key_bias is None else _add_key_bias(key_bias.to(q.dtype)),
             block_mask=block_mask)
    return out.transpose(1, 2).to(out_dtype)


def _flash_module():
    try:
        import flash_attn_interface as fa  # FlashAttention-3 (Hopper)
        return fa
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_interface as fa  # FlashAttention-2
        return fa
    except ImportError:
        return None


def _flash_available() -> Optional[str]:
    if _flash_module() is None:
        return "neither flash_attn_interface (FA3) nor flash_attn (FA2) is installed; `pip install .[flash-attn]`"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA device"
    return None


@register_attention("flash_attn", available=_flash_available, description="FlashAttention 3 or 2 kvcache kernel")
def flash_attention_backend(q, k, v, kv_lens=None, key_bias=None):
    refuse_key_bias("flash_attn", key_bias)
    fa = _flash_module()
    if kv_lens is None:
        kv_lens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
    out = fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=kv_lens.to(torch.int32))
    return out[0] if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=None)
def _fa4_module():
    """flash-attn-4's CuTe DSL kernels (Hopper / Blackwell), imported once; (module, None) or (None, why not)."""
    try:
        from flash_attn import cute
        cute.flash_attn_func, cute.flash_attn_varlen_func  # noqa: B018 - FA2's package has no cute
    except Exception as exc:  # ImportError, or the CUTLASS DSL failing to load
        return None, f"{type(exc).__name__}: {exc}"
    return cute, None


def _fa4_available() -> Optional[str]:
    module, why = _fa4_module()
    if module is None:
        return (f"flash-attn-4 is not installed ({why}); `pip install flash-attn-4` (needs nvidia-cutlass-dsl, "
                f"a Hopper or Blackwell GPU)")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10, 11):
        return "FlashAttention-4 needs a Hopper or Blackwell GPU (compute capability 9.x-11.x)"
    return None


@register_attention("fa4", available=_fa4_available, description="FlashAttention-4 (flash-attn-4, CuTe DSL)")
def fa4_attention(q, k, v, kv_lens=None, key_bias=None):
    refuse_key_bias("fa4", key_bias)
    cute, _ = _fa4_module()
    if kv_lens is None:
        out = cute.flash_attn_func(q, k, v)
    else:  # per-row valid key lengths in the batched layout
        out = cute.flash_attn_varlen_func(q, k, v, seqused_k=kv_lens.to(torch.int32))
    return out[0] if isinstance(out, tuple) else out
