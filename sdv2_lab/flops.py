"""The analytic FLOP model of ``anchors.md`` §4 (2 FLOPs per multiply-accumulate) and model-FLOPs utilisation.

DiT, per latent frame per denoising step (§4.1, §4.5), with ``tok`` video tokens per latent frame, ``L`` layers,
width ``d``, FFN width ``f``:

    linear        2·(4d² + 2d² + 2·d·f)·tok·L   self-attn q,k,v,o; cross-attn q,o; FFN
    self-attn     4·d·L_kv·tok·L                QKᵀ and PV against the KV cache (L_kv = kv_frames·tok)
    cross-attn    4·d·text_len·tok·L            QKᵀ and PV against the 512 text tokens

The text tokens' cross-attention K/V projections are *not* counted: they are computed once per prompt and
cached (the reference's ``crossattn_cache``). Neither are the patch embedding, the head, the time embedding
(``dit_uncounted_flops_per_latent_frame``: 0.01% at the released sizes), norms, RoPE or modulation, exactly as §4.
In steady state the model attends to exactly ``kv_frames`` latent frames (the cached ones and the new one), as
the tests check with torch's FLOP counter on the model.

Per output video frame: one latent frame is 4 video frames, and with a stream batch of ``n`` steps every
output latent needs ``n`` forwards, so DiT work = n × per-latent-frame / 4.

VAE, per 4-frame steady-state chunk (§4.2, §4.5): every conv and the middle attention blocks of the Wan VAE
(``sdv2_lab/vae/wan_vae.py``) walked layer by layer; at 480×832 this is 8.05 TFLOP encode and 13.55 decode.
The TAEHV decoder (and encoder) are walked the same way (``sdv2_lab/vae/taehv.py``); anchors give no TAEHV
figure, so those walks are checked against ``torch.utils.flop_counter`` on the module itself in the tests.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence, Union

from .units import FRAMES_PER_LATENT, PIXELS_PER_LATENT as VAE_SPATIAL_STRIDE, tokens_per_latent_frame

# Dense bf16 matmul peaks in TFLOP/s, used only when the harness gives no measured peak (measure it:
# ``measure_peak_tflops``). Keys match as case-insensitive substrings of the device name, longest key first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100": 800.0,   # measured 796–819 on H100 80GB HBM3 SXM (reference_speed_h100.md); anchors §4.3 uses 800.
                     # An H100 PCIe is slower (spec 756 vs 989 dense): measure it.
    "H200": 800.0,   # same GH100 compute as H100 (spec 989 dense for both); assumed equal to the H100 measurement
    "A100": 312.0,   # NVIDIA spec, dense bf16 (not measured here)
    "4090": 165.2,   # NVIDIA Ada spec, dense bf16 with fp32 accumulate (not measured here)
}


# ---------------------------------------------------------------------------------------------------- DiT
tokens_per_frame = tokens_per_latent_frame   # 480x832 -> 30*52 = 1560; 512x512 -> 1024 (sdv2_lab/units.py)


@dataclass(frozen=True)
class DiTFlops:
    """FLOPs of one DiT forward for one latent frame, by part (anchors §4.2 columns)."""
    linear: float
    self_attention: float
    cross_attention: float

    @property
    def total(self) -> float:
        return self.linear + self.self_attention + self.cross_attention


def dit_flops_breakdown(cfg, tokens_per_frame: int, kv_tokens: int, text_len: int = 512) -> DiTFlops:
    """``cfg``: a ``WanDiTConfig`` (or anything with ``dim``, ``ffn_dim``, ``num_layers``)."""
    d, f, L, tok = cfg.dim, cfg.ffn_dim, cfg.num_layers, tokens_per_frame
    return DiTFlops(linear=2 * (6 * d * d + 2 * d * f) * tok * L,
                    self_attention=4 * d * kv_tokens * tok * L,
                    cross_attention=4 * d * text_len * tok * L)


def dit_flops_per_latent_frame(cfg, tokens_per_frame: int, kv_tokens: int, text_len: int = 512) -> float:
    """FLOPs of one denoising step of one latent frame (anchors §4.2 "Total": 6.74 T for 1.3B at 480p)."""
    return dit_flops_breakdown(cfg, tokens_per_frame, kv_tokens, text_len).total


def dit_uncounted_flops_per_latent_frame(cfg, tokens_per_frame: int) -> float:
    """What §4 leaves out of a forward: patch embedding and head (per token), time embedding and projection
    (per latent frame). 0.01% of the total at the released sizes; it matters only for tiny test models."""
    d, p = cfg.dim, math.prod(cfg.patch_size)
    per_token = 2 * cfg.in_dim * p * d + 2 * d * cfg.out_dim * p
    per_frame = 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    return per_token * tokens_per_frame + per_frame


# ---------------------------------------------------------------------------------------------------- VAE
def _conv(cin: int, cout: int, kernel_volume: int, out_positions: int) -> int:
    return 2 * cin * cout * kernel_volume * out_positions


def _frame_attention(c: int, n: int) -> int:
    """The Wan VAE's single-head attention over the n = h·w positions of one frame: qkv, QKᵀ + PV, proj."""
    return _conv(c, 3 * c, 1, n) + 4 * n * n * c + _conv(c, c, 1, n)


def _residual_block(cin: int, cout: int, positions: int) -> int:
    shortcut = _conv(cin, cout, 1, positions) if cin != cout else 0
    return _conv(cin, cout, 27, positions) + _conv(cout, cout, 27, positions) + shortcut


def wan_vae_flops_per_chunk(height: int, width: int, *, dim: int = 96, z_dim: int = 16,
                            dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                            temporal_downsample: Sequence[bool] = (False, True, True)) -> tuple[float, float]:
    """(encode, decode) FLOPs of one steady-state chunk: 4 video frames ↔ 1 latent frame (not a stream's first
    chunk). Mirrors ``Encoder3d`` / ``Decoder3d``: 3×3×3 causal convs see their cached frames and produce one
    output per input frame; a temporal downsample halves T after its 2-D conv; the middle blocks attend per frame."""
    if height % VAE_SPATIAL_STRIDE or width % VAE_SPATIAL_STRIDE:
        raise ValueError(f"VAE needs height and width divisible by {VAE_SPATIAL_STRIDE}, got {height}x{width}")
    # encoder: 4 frames at full size -> 1 latent at /8
    dims = [dim * m for m in (1, *dim_mult)]
    t, h, w = FRAMES_PER_LATENT, height, width
    enc = _conv(3, dims[0], 27, t * h * w)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            enc += _residual_block(cin, cout, t * h * w)
            cin = cout
        if i != len(dim_mult) - 1:
            h, w = h // 2, w // 2
            enc += _conv(cout, cout, 9, t * h * w)              # 3×3 stride-2 conv per frame
            if temporal_downsample[i]:
                t //= 2
                enc += _conv(cout, cout, 3, t * h * w)          # (3,1,1) stride-2 time conv
    c = dims[-1]
    enc += 2 * _residual_block(c, c, t * h * w) + t * _frame_attention(c, h * w)
    # head to (mu, log-variance), then conv1 for mu only (the log-variance is never used)
    enc += _conv(c, 2 * z_dim, 27, t * h * w) + _conv(2 * z_dim, z_dim, 1, t * h * w)

    # decoder: 1 latent -> 4 frames
    dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
    temporal_upsample = tuple(temporal_downsample)[::-1]
    t, h, w = 1, height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE
    dec = _conv(z_dim, z_dim, 1, t * h * w) + _conv(z_dim, dims[0], 27, t * h * w)        # conv2, conv1
    c = dims[0]
    dec += 2 * _residual_block(c, c, t * h * w) + t * _frame_attention(c, h * w)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2  # every upsampler halves the channels
        for _ in range(num_res_blocks + 1):
            dec += _residual_block(cin, cout, t * h * w)
            cin = cout
        if i != len(dim_mult) - 1:
            if temporal_upsample[i]:
                dec += _conv(cout, 2 * cout, 3, t * h * w)      # (3,1,1) time conv to 2C = two frames
                t *= 2
            h, w = h * 2, w * 2
            dec += _conv(cout, cout // 2, 9, t * h * w)         # nearest ×2, then 3×3 conv
    dec += _conv(dims[-1], 3, 27, t * h * w)
    return float(enc), float(dec)


def taehv_flops_per_chunk(height: int, width: int) -> tuple[float, float]:
    """(encode, decode) FLOPs of TAEHV (``taehv.py``, ×4 time, ×8 space) for 4 frames ↔ 1 latent frame.
    A MemBlock's first conv sees 2C channels (the frame and the previous frame's input)."""
    if height % VAE_SPATIAL_STRIDE or width % VAE_SPATIAL_STRIDE:
        raise ValueError(f"VAE needs height and width divisible by {VAE_SPATIAL_STRIDE}, got {height}x{width}")

    def memblock(cin, cout, positions):
        skip = _conv(cin, cout, 1, positions) if cin != cout else 0
        return _conv(2 * cin, cout, 9, positions) + 2 * _conv(cout, cout, 9, positions) + skip

    c, z = 64, 16
    # encoder: frames T=4 at full size; TPool(2), stride-2 conv, 3 MemBlocks; again; TPool(1), ...; conv to z
    t, h, w = FRAMES_PER_LATENT, height, width
    enc = _conv(3, c, 9, t * h * w)
    for pool in (2, 2, 1):
        t //= pool
        enc += _conv(c * pool, c, 1, t * h * w)
        h, w = (h + 1) // 2, (w + 1) // 2
        enc += _conv(c, c, 9, t * h * w) + 3 * memblock(c, c, t * h * w)
    enc += _conv(c, z, 9, t * h * w)

    n = (256, 128, 64, 64)
    t, h, w = 1, height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE
    dec = _conv(z, n[0], 9, t * h * w) + 3 * memblock(n[0], n[0], t * h * w)
    for i, grow in enumerate((1, 2, 2)):
        h, w = h * 2, w * 2
        dec += _conv(n[i], n[i] * grow, 1, t * h * w)           # TGrow before the frames split
        t *= grow
        dec += _conv(n[i], n[i + 1], 9, t * h * w)
        if i < 2:
            dec += 3 * memblock(n[i + 1], n[i + 1], t * h * w)
    dec += _conv(n[3], 3, 9, t * h * w)
    return float(enc), float(dec)


def _vae_spec(vae) -> Optional[dict]:
    """None/"none" -> no VAE; "wan" / "taehv" / a conf/vae mapping (name, dim, encoder) -> a dict."""
    if vae is None:
        return None
    if isinstance(vae, str):
        spec = {"name": vae}
    elif isinstance(vae, Mapping) or hasattr(vae, "get"):
        spec = {k: vae.get(k) for k in ("name", "dim", "encoder") if vae.get(k) is not None}
    else:
        raise TypeError(f"vae must be a name or a conf/vae mapping, got {type(vae).__name__}")
    name = spec.get("name")
    if name in (None, "none"):
        return None
    if name not in ("wan", "taehv"):
        raise ValueError(f"no FLOP model for vae {name!r}; known: 'wan', 'taehv', 'none'")
    return spec


def vae_flops_per_video_frame(vae, height: int, width: int) -> tuple[float, float]:
    """(encode, decode) FLOPs per video frame in steady state. ``vae``: "wan", "taehv" (Wan encoder + TAEHV
    decoder, as the reference's --use_taehv), a conf/vae mapping (``dim``, ``encoder: wan|taehv``), or None."""
    spec = _vae_spec(vae)
    if spec is None:
        return 0.0, 0.0
    wan_enc, wan_dec = wan_vae_flops_per_chunk(height, width, dim=int(spec.get("dim", 96)))
    if spec["name"] == "wan":
        enc, dec = wan_enc, wan_dec
    else:
        tae_enc, tae_dec = taehv_flops_per_chunk(height, width)
        enc = tae_enc if spec.get("encoder", "wan") == "taehv" else wan_enc
        dec = tae_dec
    return enc / FRAMES_PER_LATENT, dec / FRAMES_PER_LATENT


# ---------------------------------------------------------------------------------------------------- per frame
@dataclass(frozen=True)
class FrameFlops:
    """FLOPs per output video frame, by stage. ``total`` is what MFU "DiT+VAE" uses, ``dit`` MFU "DiT only"."""
    dit: float
    vae_encode: float = 0.0
    vae_decode: float = 0.0

    @property
    def vae(self) -> float:
        return self.vae_encode + self.vae_decode

    @property
    def total(self) -> float:
        return self.dit + self.vae

    def as_dict(self, prefix: str = "flops_per_frame_") -> dict:
        d = asdict(self) | {"vae": self.vae, "total": self.total}
        return {prefix + k: v for k, v in d.items()}


def flops_per_output_frame(cfg, height: int, width: int, steps: int, kv_frames: int, vae="wan",
                           text_len: int = 512) -> FrameFlops:
    """Analytic FLOPs per output video frame: DiT = steps × per-latent-frame / 4 (stream batch: each output
    latent passes ``steps`` forwards), the self-attention over ``kv_frames`` latent frames of KV cache
    (the config's ``num_kv_cache``), plus the VAE's steady-state encode and decode (``vae=None``: DiT only)."""
    if steps < 1 or kv_frames < 1:
        raise ValueError(f"steps and kv_frames must be >= 1, got steps={steps}, kv_frames={kv_frames}")
    tok = tokens_per_frame(height, width)
    dit = steps * dit_flops_per_latent_frame(cfg, tok, kv_frames * tok, text_len) / FRAMES_PER_LATENT
    enc, dec = vae_flops_per_video_frame(vae, height, width)
    return FrameFlops(dit=dit, vae_encode=enc, vae_decode=dec)


# ---------------------------------------------------------------------------------------------------- MFU
def mfu(flops_per_frame: Union[float, FrameFlops], fps: float, peak_flops: float, num_gpus: int = 1) -> float:
    """Model-FLOPs utilisation as a fraction: FLOPs per frame × FPS ÷ (GPUs × peak FLOP/s).
    ``peak_flops`` is in FLOP/s (e.g. 800e12), not TFLOP/s."""
    if isinstance(flops_per_frame, FrameFlops):
        flops_per_frame = flops_per_frame.total
    if peak_flops < 1e9:
        raise ValueError(f"peak_flops={peak_flops} looks like TFLOP/s; pass FLOP/s (e.g. 800e12)")
    return flops_per_frame * fps / (num_gpus * peak_flops)


def peak_bf16_tflops(device_name: str, measured: Optional[float] = None) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from): the measured value when given, else ``PEAK_BF16_TFLOPS`` by name,
    else (None, "unknown") — no MFU is better than an invented one (CPU included)."""
    if measured is not None:
        return float(measured), "measured"
    name = (device_name or "").upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.upper() in name:
            return PEAK_BF16_TFLOPS[key], f"table:{key}"
    return None, "unknown"


def measure_peak_tflops(device, dtype=None, n: int = 8192, iters: int = 20) -> float:
    """Achieved dense matmul TFLOP/s on ``device`` (bf16 by default): the denominator MFU should use."""
    import torch
    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
