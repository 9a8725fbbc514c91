"""The causal Wan2.1 T2V DiT with a streaming KV cache (reference.md §1.1-1.7), in one file.

Parameter names equal the original Wan2.1 / StreamDiffusionV2 checkpoints, so official files load with no
renaming. Numerics follow the reference (RMSNorm in fp32 then cast, LayerNorm on the activation dtype,
per-latent-frame modulation, cross-attention over all 512 padded text tokens, head modulated by the time
embedding ``e``); RoPE and the timestep sinusoid are computed once per position from float64 tables.

The per-chunk path does no host syncs and no Python loops over the batch: positions arrive as host ints
(the pipeline knows them), their device copies are built once per call by the cache's ``plan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..units import PIXELS_PER_LATENT, check_resolution
from .attention import get_attention
from .kv_cache import CacheSpec, StepPlan, StreamKVCache


@dataclass
class WanDiTConfig:
    """Sizes of a Wan2.1 DiT. ``conf/backbone/*.yaml`` hold the released sizes and the test size."""
    name: str = "wan_1_3b"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024   # temporal positions available; the pipeline rebases long streams
    attention: str = "sdpa"

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.dim % self.num_heads:
            raise ValueError(f"backbone {self.name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"backbone {self.name}: head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def num_parameters(self) -> int:
        d, f, L = self.dim, self.ffn_dim, self.num_layers
        p = math.prod(self.patch_size)
        block = 8 * (d * d + d) + 4 * d + 2 * d + 2 * d * f + f + d + 6 * d
        return (L * block + self.in_dim * p * d + d + self.text_dim * d + d + d * d + d
                + self.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d + 2 * d + d * self.out_dim * p
                + self.out_dim * p)


def rms_norm(x, weight, eps):
    """Wan's RMSNorm: statistics in fp32, cast back, then the weight (in the weight's dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def layer_norm(x, eps, weight=None, bias=None):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).type_as(x)


def apply_rope(x: torch.Tensor, phasor: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (re = 2k, im = 2k+1) by unit phasors; x [B, L, H, dh], phasor
    [B, L, 1, dh/2] complex64. One complex multiply in fp32, cast back to x's dtype."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * phasor).flatten(-2).type_as(x)


def apply_rope_pairs(x: torch.Tensor, phasor_pairs: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` in real arithmetic, which torch.compile fuses into one kernel (it does not generate code for
    complex tensors); phasor_pairs [B, L, 1, dh/2, 2] is ``view_as_real`` of the phasors."""
    xp = x.float().unflatten(-1, (-1, 2))
    re, im = xp[..., 0], xp[..., 1]
    c, s = phasor_pairs[..., 0], phasor_pairs[..., 1]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2).type_as(x)


def norm_modulate(x, eps, scale, shift, f: int):
    """LayerNorm (no affine), then per-latent-frame ``* (1 + scale) + shift``; x [B, F*S, D], scale [B, F, 1, D]."""
    return (layer_norm(x, eps).unflatten(1, (f, -1)) * (1 + scale) + shift).flatten(1, 2)


def gated_residual(x, y, gate, f: int):
    """x + gate * y with a per-latent-frame gate."""
    return x + (y.unflatten(1, (f, -1)) * gate).flatten(1, 2)


class Kernels:
    """The elementwise chains of a block. Eager by default (bit-exact with the reference); ``compiled()``
    fuses each chain into one or two kernels with torch.compile (results then differ at bf16 rounding level)."""
    rms_norm = staticmethod(rms_norm)
    rope = staticmethod(apply_rope)
    norm_modulate = staticmethod(norm_modulate)
    gated_residual = staticmethod(gated_residual)

    @classmethod
    def compiled(cls) -> "Kernels":
        k = cls()
        # Static shapes (fast kernels), one compile per shape: a stream sees up to ~12 per chain (batch rows
        # 1..4 while the stream batch fills, first chunk vs later, text tokens), more than dynamo's default 8.
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(dynamo_config, name, 64) < 64:
                setattr(dynamo_config, name, 64)
        opts = dict(dynamic=False, fullgraph=True)
        k.rms_norm = torch.compile(rms_norm, **opts)
        rope_pairs = torch.compile(apply_rope_pairs, **opts)
        k.rope = lambda x, phasor: rope_pairs(x, torch.view_as_real(phasor))
        k.norm_modulate = torch.compile(norm_modulate, **opts)
        k.gated_residual = torch.compile(gated_residual, **opts)
        return k


EAGER = Kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = EAGER

    def forward(self, x):
        return self.kernels.rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.kernels = EAGER

    def fuse_qkv(self) -> None:
        """Make q/k/v weights views of one [3D, D] tensor so the projections run as one GEMM. The parameters
        keep their names and sizes (state dicts are unchanged); loading new weights undoes the fusion."""
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight]).detach()
        b = torch.cat([self.q.bias, self.k.bias, self.v.bias]).detach()
        d = self.q.weight.shape[0]
        for i, lin in enumerate((self.q, self.k, self.v)):
            lin.weight = nn.Parameter(w[i * d:(i + 1) * d], requires_grad=False)
            lin.bias = nn.Parameter(b[i * d:(i + 1) * d], requires_grad=False)
        self._fused = (w, b)

    def unfuse_qkv(self) -> None:
        """Forget the fused [3D, D] tensor (the block's storage is about to go)."""
        self.__dict__.pop("_fused", None)

    def _project(self, x):
        fused = getattr(self, "_fused", None)
        if fused is not None and fused[0].data_ptr() == self.q.weight.data_ptr() \
                and self.v.weight.data_ptr() == fused[0][2 * fused[0].shape[0] // 3:].data_ptr():
            return F.linear(x, *fused).chunk(3, dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x, rope, cache: StreamKVCache, layer: int, plan: StepPlan, attend):
        b, n, _ = x.shape
        q, k, v = self._project(x)
        q = self.norm_q(q).view(b, n, self.num_heads, -1)
        k = self.norm_k(k).view(b, n, self.num_heads, -1)
        v = v.view(b, n, self.num_heads, -1)
        q, k = self.kernels.rope(q, rope), self.kernels.rope(k, rope)
        k_all, v_all, kv_lens, key_bias = cache.update(layer, plan, k, v)
        if key_bias is None:
            return self.o(attend(q, k_all, v_all, kv_lens).flatten(2))
        return self.o(attend(q, k_all, v_all, kv_lens, key_bias=key_bias).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention; K/V depend only on the prompt, so they are computed once per prompt."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def context_kv(self, context):
        b, n, _ = context.shape
        return (self.norm_k(self.k(context)).view(b, n, self.num_heads, -1),
                self.v(context).view(b, n, self.num_heads, -1))

    def forward(self, x, k, v, attend):
        """k, v: [B, H, Ltxt, dh] (the cache's layout), handed to ``attend`` as [B, Ltxt, H, dh] views."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        return self.o(attend(q, k.transpose(1, 2), v.transpose(1, 2), None).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)  # affine: cross_attn_norm=True in both released models
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        # values from init_weights (Wan's randn / sqrt(dim)) or a checkpoint: the loader builds on the meta device,
        # where torch's first arithmetic op imports TorchDynamo (2 s of every process that builds a DiT)
        self.modulation = nn.Parameter(torch.empty(1, 6, d))
        self.kernels = EAGER

    def forward(self, x, e0, rope, cross_kv, cache, layer, plan, attend):
        f = e0.shape[1]
        k = self.kernels
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
        y = self.self_attn(k.norm_modulate(x, self.eps, scale_sa, shift_sa, f), rope, cache, layer, plan, attend)
        x = k.gated_residual(x, y, gate_sa, f)
        x = x + self.cross_attn(layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias), *cross_kv, attend)
        return k.gated_residual(x, self.ffn(k.norm_modulate(x, self.eps, scale_ff, shift_ff, f)), gate_ff, f)


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))   # as Block's: set by init_weights or a file

    def forward(self, x, e):
        """x [B, F*S, D]; e [B, F, D] (the time embedding, not its 6-way projection)."""
        f = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(layer_norm(x, self.eps).unflatten(1, (f, -1)) * (1 + scale) + shift)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cos-first sinusoidal embedding in float64 (as the reference), [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(positions: int, pairs_dim: int, theta: float) -> torch.Tensor:
    """[positions, pairs_dim/2] angles p / theta^(2k/pairs_dim) in float64."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, pairs_dim, 2, dtype=torch.float64) / pairs_dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv)


class CausalWanDiT(nn.Module):
    """The causal Wan2.1 DiT. ``forward`` processes one chunk of latent frames for every stream-batch row."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.weights_are_dummy = False
        self.set_attention(cfg.attention)
        c = cfg.head_dim // 2
        self._rope_split = (c - 2 * (c // 3), c // 3, c // 3)  # temporal / height / width complex pairs
        self._rope_cache: dict = {}

    # ------------------------------------------------------------------ configuration
    def use_compiled_kernels(self, enabled: bool = True) -> None:
        """Fuse the blocks' elementwise chains with torch.compile (GPU speed; eager stays reference-exact)."""
        kernels = Kernels.compiled() if enabled else EAGER
        for m in self.modules():
            if hasattr(m, "kernels"):
                m.kernels = kernels

    def fuse_qkv(self) -> None:
        """One GEMM for q/k/v in every block this model holds (see ``SelfAttention.fuse_qkv``)."""
        for blk in self.blocks:
            if not blk.self_attn.q.weight.is_meta:
                blk.self_attn.fuse_qkv()

    # ------------------------------------------------------------------ parts (a pipe stage holds some of them)
    def block_arrived(self, layer: int) -> None:
        """Block ``layer``'s weights were just written in place (a pipe stage received it): fuse it as the others."""
        self.blocks[layer].self_attn.fuse_qkv()

    def block_left(self, layer: int) -> None:
        """Block ``layer`` now lives elsewhere (a pipe stage handed it on): drop its fused weights and storage."""
        self.blocks[layer].self_attn.unfuse_qkv()
        self.blocks[layer].to("meta")

    def part_names(self) -> list[str]:
        """The model's parts in order: the embeddings, each block, the head. Dummy weights are drawn per part."""
        return ["patch_embedding", "text_embedding", "time_embedding", "time_projection",
                *[f"blocks.{i}" for i in range(self.cfg.num_layers)], "head"]

    def held_parts(self) -> list[str]:
        """The parts whose weights this model holds (all, unless it is a ``pipe`` stage built on the meta device)."""
        return [n for n in self.part_names() if not next(self.get_submodule(n).parameters()).is_meta]

    def held_parameter(self) -> torch.Tensor:
        """A parameter this model holds (its device and dtype are the model's)."""
        for p in self.parameters():
            if not p.is_meta:
                return p
        raise RuntimeError(f"backbone {self.cfg.name}: no part is held (every parameter is on the meta device)")

    def set_attention(self, name: str) -> None:
        self.attention_backend = get_attention(name)
        self.cfg.attention = name

    def cache_spec(self, height: int, width: int, num_kv_frames: int, sink_frames: int = 0,
                   refresh_threshold: float = -1.0, sink_ema: float = 0.0, key_bias: float = 1.0,
                   memory_frames: int = 0, memory_interval: int = 1) -> CacheSpec:
        return CacheSpec(num_layers=self.cfg.num_layers, num_heads=self.cfg.num_heads, head_dim=self.cfg.head_dim,
                         frame_tokens=self.frame_tokens(height, width), num_frames=num_kv_frames,
                         sink_frames=sink_frames, refresh_threshold=refresh_threshold, sink_ema=sink_ema,
                         key_bias=key_bias, memory_frames=memory_frames, memory_interval=memory_interval)

    def frame_tokens(self, height: int, width: int) -> int:
        """Tokens per latent frame for a pixel resolution (VAE stride 8, this model's patch)."""
        check_resolution(height, width)
        ph, pw = self.cfg.patch_size[1:]
        return (height // PIXELS_PER_LATENT // ph) * (width // PIXELS_PER_LATENT // pw)

    def new_cache(self, rows: int, height: int, width: int, num_kv_frames: int, sink_frames: int = 0,
                  refresh_threshold: float = -1.0, dtype=None, device=None,
                  layers: Optional[tuple[int, int]] = None, kv_dtype: str = "model",
                  sink_ema: float = 0.0, key_bias: float = 1.0, memory_frames: int = 0,
                  memory_interval: int = 1) -> StreamKVCache:
        """A KV cache of ``rows`` histories (a stream's stream-batch slots, or several streams' rows) for the
        layers ``layers`` (default all), stored as ``kv_dtype`` (``kv_cache.KV_DTYPES``); ``sink_ema`` > 0: an EMA
        sink (the cache moves evicted keys to the sink's positions with ``move_keys``); ``key_bias`` < 1: Krea's KV
        attention bias (``CacheSpec.key_bias``); ``memory_frames`` > 0: MemFlow's memory bank recording every
        ``memory_interval``-th block (``memory.py``)."""
        p = self.held_parameter()
        if key_bias < 1 and not self.attention_backend.takes_key_bias:
            raise ValueError(f"kv_attention_bias={key_bias} (Krea's KV attention bias) needs attention=sdpa or flex, "
                             f"not {self.attention_backend.name}")
        spec = self.cache_spec(height, width, num_kv_frames, sink_frames, refresh_threshold, sink_ema, key_bias,
                               memory_frames, memory_interval)
        return StreamKVCache(spec, rows, dtype or p.dtype, device or p.device, layers, kv_dtype=kv_dtype,
                             move_keys=self.move_keys)

    # ------------------------------------------------------------------ prompt
    @torch.no_grad()
    def set_prompt(self, cache: StreamKVCache, context: torch.Tensor, rows: Optional[Sequence[int]] = None) -> None:
        """Compute the cross-attention K/V of a prompt embedding [1, text_len, text_dim] for the cache's layers
        and store them in ``rows`` (default: every row of the cache)."""
        self.set_context(cache, self.prompt_context(context), rows)

    @torch.no_grad()
    def prompt_context(self, context: torch.Tensor) -> torch.Tensor:
        """A prompt embedding [1, L, text_dim] -> the blocks' cross-attention context [1, text_len, D]."""
        if context.dim() != 3 or context.shape[0] != 1 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"prompt embedding must be [1, L, {self.cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] < self.cfg.text_len:  # the reference pads to text_len with zeros
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        p = self.text_embedding[0].weight
        return self.text_embedding(context.to(p.device, p.dtype))

    @torch.no_grad()
    def set_context(self, cache: StreamKVCache, ctx: torch.Tensor, rows: Optional[Sequence[int]] = None) -> None:
        """Store the cross-attention K/V of a context [1, text_len, D] (``prompt_context``) for the cache's layers
        into ``rows`` (default: every row). A ``pipe`` stage gets the context from the first stage."""
        kv = [self.blocks[i].cross_attn.context_kv(ctx) for i in range(cache.first_layer, cache.end_layer)]
        # Stored as [L, R, H, Ltxt, dh] (contiguous in SDPA's layout) with one copy per row, so attention
        # never meets a stride-0 batch or a transposed copy; memory: 2*L*R*Ltxt*D elements.
        k, v = (torch.stack([t[0] for t in part]).transpose(1, 2) for part in zip(*kv))
        cache.set_cross(range(cache.num_rows) if rows is None else rows, k, v)

    # ------------------------------------------------------------------ pieces (a pipeline stage may run a subset)
    def rope(self, start_frames: torch.Tensor, f: int, h: int, w: int, device):
        """RoPE phasors of ``f`` latent frames of ``h x w`` tokens from each row's ``start_frames``:
        [B, F*h*w, 1, head_dim/2] complex64."""
        key = (device, h, w)
        if key not in self._rope_cache:
            ct, ch, cw = self._rope_split
            dh = self.cfg.head_dim
            theta, p = self.cfg.rope_theta, self.cfg.rope_max_positions
            temporal = rope_angles(p, dh - 4 * (dh // 6), theta)
            hh = rope_angles(h, 2 * (dh // 6), theta)
            ww = rope_angles(w, 2 * (dh // 6), theta)
            spatial = torch.cat([hh[:, None, :].expand(h, w, ch), ww[None, :, :].expand(h, w, cw)], dim=-1)
            spatial = spatial.reshape(h * w, ch + cw)
            # unit phasors built in float64 (as the reference), stored as complex64
            self._rope_cache[key] = (torch.polar(torch.ones_like(temporal), temporal).to(torch.complex64).to(device),
                                     torch.polar(torch.ones_like(spatial), spatial).to(torch.complex64).to(device))
        temporal, spatial = self._rope_cache[key]
        pos = start_frames[:, None] + torch.arange(f, device=device)[None, :]  # [B, F]
        b = pos.shape[0]
        tem = temporal[pos][:, :, None, :].expand(b, f, h * w, temporal.shape[-1])
        spa = spatial[None, None].expand(b, f, h * w, spatial.shape[-1])
        return torch.cat([tem, spa], dim=-1).reshape(b, f * h * w, 1, -1)

    def move_keys(self, k: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``k`` [B, F*S, H, dh] moved ``frames`` [B, F] latent frames in time (negative: earlier):
        each temporal channel pair rotated on by that many positions' angle, the spatial pairs unchanged. RoPE is
        one rotation per pair, so this equals the keys un-roped and roped again at the new positions."""
        ct = self._rope_split[0]
        steps = self._rope_cache.get(("step", k.device))   # made on the first (eager) call: none in a graph capture
        if steps is None:
            steps = rope_angles(2, self.cfg.head_dim - 4 * (self.cfg.head_dim // 6), self.cfg.rope_theta)[1]
            steps = self._rope_cache.setdefault(("step", k.device), steps.to(k.device))   # [ct] angle per position
        angle = frames.double()[..., None] * steps                                    # [B, F, ct]
        b, f = frames.shape
        tem = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)
        tem = tem[:, :, None].expand(b, f, k.shape[1] // f, ct)
        spa = torch.ones(*tem.shape[:3], k.shape[-1] // 2 - ct, dtype=torch.complex64, device=k.device)
        return apply_rope(k, torch.cat([tem, spa], dim=-1).reshape(b, k.shape[1], 1, -1))

    def embed(self, x: torch.Tensor, t: torch.Tensor):
        """x [B, F, C, h, w] latents, t [B, F] -> tokens [B, F*S, D], e [B, F, D], e0 [B, F, 6, D]."""
        tokens = self.patchify(x)
        return (tokens, *self.time_embed(t, tokens.dtype))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, F, C, h, w] latents -> tokens [B, F*S, D] (the patch embedding)."""
        tokens = self.patch_embedding(x.transpose(1, 2).to(self.patch_embedding.weight.dtype))
        return tokens.flatten(2).transpose(1, 2)

    def time_embed(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] timesteps -> e [B, F, D] (the head's), e0 [B, F, 6, D] (the blocks' modulation)."""
        e = self.time_embedding(sinusoid(t.reshape(-1), self.cfg.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)

    def run_blocks(self, tokens, e0, rope, cache: StreamKVCache, plan: StepPlan, start: int = 0,
                   end: Optional[int] = None):
        attend = self.attention_backend.attend
        end = self.cfg.num_layers if end is None else end
        for i in range(start, end):
            tokens = self.blocks[i](tokens, e0, rope, cache.cross(i, plan), cache, i, plan, attend)
        return tokens

    def unpatchify(self, out: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """[B, F*h*w, pt*ph*pw*C] -> [B, F*pt, C, h*ph, w*pw] (features ordered pt, ph, pw, C)."""
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        b = out.shape[0]
        out = out.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 1, 4, 7, 2, 5, 3, 6)
        return out.reshape(b, f * pt, c, h * ph, w * pw)

    # ------------------------------------------------------------------ the streaming step
    def check_latent(self, x: torch.Tensor, cache: StreamKVCache) -> None:
        if x.dim() != 5 or x.shape[2] != self.cfg.in_dim:
            raise ValueError(f"latent must be [B, F, {self.cfg.in_dim}, h, w], got {tuple(x.shape)}")
        _, ph, pw = self.cfg.patch_size
        tokens = (x.shape[3] // ph) * (x.shape[4] // pw)
        if x.shape[3] % ph or x.shape[4] % pw or tokens != cache.spec.frame_tokens:
            raise ValueError(f"latent of {x.shape[3]}x{x.shape[4]} gives {tokens} tokens per frame, but the KV cache "
                             f"was built for {cache.spec.frame_tokens} (check height/width against the VAE stride 8)")

    def plan(self, x: torch.Tensor, cache: StreamKVCache, starts: Sequence[int], rows: Optional[Sequence[int]] = None,
             pop: Optional[Sequence[bool]] = None, static: bool = False, context: bool = False):
        """Check a call's inputs and make its cache plan (host work only); ``context``: a block's context pass."""
        self.check_latent(x, cache)
        if len(starts) != x.shape[0]:
            raise ValueError(f"latent batch {x.shape[0]} != {len(starts)} row positions")
        _, f, _, hl, wl = x.shape
        frames = [int(c) // cache.spec.frame_tokens for c in starts]
        if max(frames) + f > self.cfg.rope_max_positions:
            raise ValueError(f"temporal position {max(frames) + f} exceeds rope_max_positions "
                             f"{self.cfg.rope_max_positions}; rebase stream positions (the scheduler does)")
        return cache.plan(starts, f * cache.spec.frame_tokens, rows, pop, static, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cache: StreamKVCache, starts: Sequence[int],
                rows: Optional[Sequence[int]] = None, pop: Optional[Sequence[bool]] = None) -> torch.Tensor:
        """One streaming call. x [B, F, C, h, w]; t [B, F] timesteps; ``starts`` = virtual start token of each
        row (host ints); ``rows`` = the cache rows they use (default 0..B-1); ``pop`` = whether each evicting
        row rotates its eviction ring (default yes). Returns the predicted velocity [B, F, C, h, w] and
        advances the cache."""
        plan = self.plan(x, cache, starts, rows, pop)
        out = self.step(x, t, cache, plan)
        cache.commit(plan)
        return out

    def step(self, x: torch.Tensor, t: torch.Tensor, cache: StreamKVCache, plan: StepPlan) -> torch.Tensor:
        """The device work of one call for an already made plan (no host sync: CUDA-graph capturable)."""
        _, f, _, hl, wl = x.shape
        h, w = hl // self.cfg.patch_size[1], wl // self.cfg.patch_size[2]
        tokens, e, e0 = self.embed(x, t)
        rope = self.rope(plan.start_frames, f, h, w, x.device)
        tokens = self.run_blocks(tokens, e0, rope, cache, plan)
        return self.unpatchify(self.head(tokens, e).flatten(1, 2), f, h, w)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None,
                     parts: Optional[Sequence[str]] = None) -> None:
        """Wan's init (xavier linears, small embeddings), part by part; used for dummy weights and tests.

        With ``seed``, each part (``part_names``: the embeddings, every block, the head) draws from its own
        generator seeded by (seed, part name), on the part's device: a part's weights do not depend on which other
        parts exist, so a ``pipe`` stage makes exactly its own share of the full model's weights. ``parts``: the
        parts to initialise (default all)."""
        for name in self.part_names():
            if parts is not None and name not in parts:
                continue
            module = self.get_submodule(name)
            g = generator
            if seed is not None:
                g = torch.Generator(device=next(module.parameters()).device).manual_seed(part_seed(seed, name))
            self._init_part(name, module, g)

    def _init_part(self, name: str, module: nn.Module, g: torch.Generator) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if name == "patch_embedding":
            nn.init.xavier_uniform_(module.weight.view(self.cfg.dim, -1), generator=g)
            nn.init.zeros_(module.bias)
        elif name in ("text_embedding", "time_embedding"):
            for m in module:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
        elif name.startswith("blocks.") or name == "head":
            module.modulation.normal_(generator=g).div_(self.cfg.dim ** 0.5)


def part_seed(seed: int, name: str) -> int:
    """A generator seed for one part of the model, stable across runs and processes."""
    import zlib
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2 ** 63)
