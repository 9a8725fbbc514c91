"""FP8 (e4m3) weights and activations for the DiT's linear layers (``dit_precision: fp8``).

``quantize_dit(model)`` swaps the per-chunk ``nn.Linear``s of a *loaded* ``CausalWanDiT`` (self-attention
q/k/v/o, cross-attention q/o, FFN) for ``Fp8Linear``: weights stored in e4m3 with one fp32 scale per output
row (or per tensor), activations quantized on the fly per token (row) or per tensor, then one
``torch._scaled_mm`` (CUTLASS / cuBLASLt FP8 GEMM on Hopper and Ada; a CPU kernel in recent torch) with the
bias in its epilogue and bf16 output. Layers that run once per prompt or on a handful of tokens (text and
time embeddings, cross-attention k/v, the head) stay in the model dtype: they cost nothing per chunk and
keep their precision.

Quantize after loading weights: the swapped modules keep the parameter names (``...q.weight`` is the e4m3
weight, ``...q.weight_scale`` its scales), and checkpoints load into the unquantized model.
Quantize on the target device: ``load_backbone(..., device=...)`` then ``quantize_dit``.

The fused q/k/v projection (``SelfAttention.fuse_qkv``) stays one GEMM: one e4m3 [3D, D] weight (a
non-persistent buffer of the attention module) whose row slices are the q/k/v weights, and the module's
``_project`` replaced by an FP8 version; the bf16 fused copy is dropped.

``quantize_dit_torchao(model)`` (``fp8_kernel: torchao``) quantizes the same linears with torchao's
``Float8DynamicActivationFloat8WeightConfig`` (per row or per tensor): the weights become torchao
``Float8Tensor``s inside the ``nn.Linear``s, activations are quantized per call by torchao and multiplied by
the same ``torch._scaled_mm`` (torchao picks its MSLK kernels only where the ``mslk`` package is installed);
the fused q/k/v is one [3D, D] ``Float8Tensor`` whose row slices are q/k/v's weights. It needs CUDA with
compute capability >= 8.9 and a bf16 DiT (torchao 0.18 refuses a CPU), and the optional ``torchao`` package.

Math (``quantize``): ``scale = max(amax, eps) / 448``, ``q = e4m3(clamp(x / scale, +-448))``,
``x ~= float(q) * scale``; relative rounding error at most 2**-4 per element in e4m3's normal range.
"""
from __future__ import annotations

import functools
import logging
import re
import types
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
EPS = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero

# Linears that run on every chunk's tokens; everything else stays in the model dtype.
HOT_LINEARS = r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.[02])"

# amax over what one scale covers: a row (token / output channel) or the whole tensor, kept 2-D
_AMAX: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "row": lambda x: x.abs().amax(dim=-1, keepdim=True),
    "tensor": lambda x: x.abs().amax().reshape(1, 1),
}


def quantize(x: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1] or [1, 1]) with x ~= q.float() * scale."""
    xf = x.float()
    scale = _AMAX[granularity](xf).clamp(min=EPS) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


@functools.lru_cache(maxsize=None)
def _compiled_quantize(granularity: str):
    # One fused pass (amax + scale + cast) instead of ~7 eager kernels per linear. One compile per K (2 per
    # model size and granularity) and a dynamic token count.
    _raise_dynamo_limits()
    return torch.compile(functools.partial(quantize, granularity=granularity), fullgraph=True)


def _raise_dynamo_limits() -> None:
    # dynamo's per-function limit of 8 compiles, raised like wan_dit.Kernels.compiled does, so that two model
    # sizes in one process never fall back to eager
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, 64) < 64:
            setattr(dynamo_config, name, 64)


def _mark_tokens_dynamic(x2d: torch.Tensor) -> torch.Tensor:
    # tokens vary (chunk length, stream-batch rows): dynamic; K stays static (a persistent reduction)
    torch._dynamo.maybe_mark_dynamic(x2d, 0)
    torch._dynamo.mark_static(x2d, 1)
    return x2d


def _activation_quantizer(granularity: str, compiled: bool):
    if not compiled:
        return functools.partial(quantize, granularity=granularity)
    fn = _compiled_quantize(granularity)

    def quantize_tokens(x):
        return fn(_mark_tokens_dynamic(x))
    return quantize_tokens


# ------------------------------------------------------------------ GEMMs: (xq, x_scale, wq, w_scale, bias, dtype)
def _gemm_scaled_mm(xq, xs, wq, ws, bias, out_dtype, fast_accum=True):
    # wq is [N, K] row-major, so wq.t() is the column-major [K, N] operand _scaled_mm wants (no copy).
    return torch._scaled_mm(xq, wq.t(), xs, ws, bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _gemm_emulated(xq, xs, wq, ws, bias, out_dtype, fast_accum=True):
    """Dequantize and multiply in fp32: the FP8 numerics without FP8 hardware (checks, old devices)."""
    return F.linear(dequantize(xq, xs), dequantize(wq, ws.t()), None if bias is None else bias.float()).to(out_dtype)


GEMMS: dict[str, Callable] = {"scaled_mm": _gemm_scaled_mm, "emulated": _gemm_emulated}


def fp8_gemm_unsupported(device: torch.device | str) -> Optional[str]:
    """None when ``torch._scaled_mm`` runs FP8 GEMMs on ``device``, else the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return (f"FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
        return None
    try:  # CPU kernel present in recent torch builds only
        a = torch.zeros(16, 16, device=device, dtype=E4M3)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch {torch.__version__} has no FP8 GEMM on {device.type}: {str(exc).splitlines()[0]}"
    return None


def _pick_gemm(gemm: str, device: torch.device) -> str:
    if gemm != "auto":
        if gemm not in GEMMS:
            raise ValueError(f"unknown FP8 gemm {gemm!r}; known: {sorted(GEMMS)} or 'auto'")
        return gemm
    reason = fp8_gemm_unsupported(device)
    if reason is None:
        return "scaled_mm"
    if device.type == "cuda":  # emulation there would be slower than bf16: refuse instead
        raise RuntimeError(f"dit_precision=fp8: {reason}; use dit_precision=bf16")
    log.warning("FP8 GEMM emulated on %s (%s): FP8 numerics, no speed-up", device, reason)
    return "emulated"


# ------------------------------------------------------------------ the module
class Fp8Linear(nn.Module):
    """A linear layer with an e4m3 weight [N, K] and fp32 scales ([1, N] per row, or [1, 1]); activations are
    quantized at call time with the same granularity. Output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor], *,
                 granularity: str = "row", gemm: str = "scaled_mm", fast_accum: bool = True, compiled: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.granularity, self.gemm_name, self.fast_accum = granularity, gemm, fast_accum
        self._quantize = _activation_quantizer(granularity, compiled)
        self._gemm = functools.partial(GEMMS[gemm], fast_accum=fast_accum)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], granularity: str = "row", **kw):
        wq, ws = quantize(weight.detach(), granularity)
        return cls(wq, ws.t().contiguous(), None if bias is None else bias.detach(), granularity=granularity, **kw)

    def linear(self, x, weight, weight_scale, bias):
        lead = x.shape[:-1]
        xq, xs = self._quantize(x.reshape(-1, x.shape[-1]))
        return self._gemm(xq, xs, weight, weight_scale, bias, x.dtype).reshape(*lead, weight.shape[0])

    def forward(self, x):
        return self.linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"granularity={self.granularity}, gemm={self.gemm_name}, fast_accum={self.fast_accum}")


def _project_fp8_qkv(self, x):
    """SelfAttention._project for FP8: q/k/v as one GEMM over the fused e4m3 weight."""
    return self.q.linear(x, self._fp8_qkv_weight, self._fp8_qkv_scale, self._fp8_qkv_bias).chunk(3, dim=-1)


def _quantize_fused_qkv(attn: nn.Module, **kw) -> None:
    lins = (attn.q, attn.k, attn.v)
    fused = Fp8Linear.from_weight(torch.cat([m.weight for m in lins]),
                                  torch.cat([m.bias for m in lins]) if lins[0].bias is not None else None, **kw)
    attn.__dict__.pop("_fused", None)  # the bf16 fused copy: free it
    # Non-persistent buffers: moved by .to(), absent from the state dict (which keeps q/k/v.*).
    attn.register_buffer("_fp8_qkv_weight", fused.weight.data, persistent=False)
    attn.register_buffer("_fp8_qkv_scale", fused.weight_scale, persistent=False)
    attn.register_buffer("_fp8_qkv_bias", None if fused.bias is None else fused.bias.data, persistent=False)
    d = lins[0].out_features
    per_row = fused.weight_scale.shape[1] > 1
    for i, name in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        setattr(attn, name, Fp8Linear(fused.weight.data[rows], fused.weight_scale[:, rows] if per_row else fused.weight_scale,
                                      None if fused.bias is None else fused.bias.data[rows], **kw))
    attn._project = types.MethodType(_project_fp8_qkv, attn)


def _hot_linears(model: nn.Module, include: str) -> dict[str, nn.Linear]:
    """The still-unquantized ``nn.Linear``s named by ``include`` whose sizes an FP8 GEMM takes (multiples of 16)."""
    pattern = re.compile(include)
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and type(m.weight) is nn.Parameter and pattern.fullmatch(name)
            and m.in_features % 16 == 0 and m.out_features % 16 == 0}


def _fusable_attentions(model: nn.Module, hot: dict) -> list[tuple[str, nn.Module]]:
    """Self-attention modules (``SelfAttention._project``) whose q, k and v are all in ``hot``: one fused GEMM."""
    return [(name, attn) for name, attn in model.named_modules()
            if hasattr(attn, "_project") and all(f"{name}.{c}" in hot for c in "qkv")]


def _check_one_kernel(model: nn.Module, kernel: str) -> None:
    done = getattr(model, "fp8_kernel", kernel)
    if done != kernel:
        raise ValueError(f"this DiT is already quantized with fp8_kernel={done}; load it again for fp8_kernel={kernel}")


def quantize_dit(model: nn.Module, granularity: str = "row", *, include: str = HOT_LINEARS, gemm: str = "auto",
                 fast_accum: bool = True, compiled: Optional[bool] = None) -> nn.Module:
    """Swap ``model``'s linears whose names match ``include`` for ``Fp8Linear``, in place; returns ``model``.

    granularity: "row" (per-token activations, per-output-channel weights; default) or "tensor".
    gemm: "auto" (``_scaled_mm`` where FP8 GEMMs run, CPU emulation otherwise, an error on a CUDA device
    without them), "scaled_mm" or "emulated". fast_accum: Hopper's fast FP8 accumulation (no periodic fp32
    promotion). compiled: fuse activation quantization with torch.compile (default: on CUDA).
    Linears with sizes not divisible by 16 (an FP8 GEMM constraint) are left as they are.
    """
    if granularity not in _AMAX:
        raise ValueError(f"FP8 granularity {granularity!r}: expected one of {sorted(_AMAX)}")
    _check_one_kernel(model, "ours")
    p = next(model.parameters())
    if p.device.type == "cuda" and p.dtype != torch.bfloat16:
        raise ValueError(f"dit_precision=fp8 on CUDA needs a bfloat16 model (FP8 GEMMs write bf16), got {p.dtype}")
    kw = dict(granularity=granularity, gemm=_pick_gemm(gemm, p.device), fast_accum=fast_accum,
              compiled=p.device.type == "cuda" if compiled is None else compiled)
    hot = _hot_linears(model, include)
    for name, attn in _fusable_attentions(model, hot):
        _quantize_fused_qkv(attn, **kw)
        for c in "qkv":
            del hot[f"{name}.{c}"]
    for name, lin in hot.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp8Linear.from_weight(lin.weight, lin.bias, **kw))
    model.dit_precision, model.fp8_kernel = "fp8", "ours"
    return model


# ------------------------------------------------------------------ torchao's float8 (fp8_kernel: torchao)
TORCHAO_REQUIREMENT = "torchao==0.18.0"  # the version tested here (pyproject's fp8 extra, .ci/constraints.txt)


def import_torchao_quantization():
    """``torchao.quantization``, or an ImportError that says how to install it (never with its dependencies:
    they would replace this machine's torch)."""
    try:
        import torchao.quantization as ao
    except ImportError:
        raise ImportError(f"fp8_kernel=torchao needs the torchao package: pip install --no-deps "
                          f"{TORCHAO_REQUIREMENT}") from None
    return ao


def torchao_fp8_unsupported(device: torch.device | str) -> Optional[str]:
    """None when torchao's float8 quantization runs on ``device``, else the reason. torchao 0.18 refuses a CPU
    at quantize time (its ``_check_hardware_support``), although its GEMM is torch's ``_scaled_mm``."""
    device = torch.device(device)
    if device.type == "cuda":
        return fp8_gemm_unsupported(device)
    return f"torchao's float8 quantization runs on CUDA (compute capability >= 8.9), not on {device.type}"


def _torchao_linear(x, weight, bias):
    # F.linear over a torchao Float8Tensor weight: quantizes x per its act_quant_kwargs, then torch._scaled_mm
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _compiled_torchao_linear():
    # torchao's activation quantization is ~6 eager kernels per linear; compiled it is one fused pass before the
    # GEMM, as with ours. The weight is an input: one compile per (K, N, granularity), not one per module.
    _raise_dynamo_limits()
    logging.getLogger("torch._inductor.codecache").addFilter(_drop_subclass_cache_key_warning)
    return torch.compile(_torchao_linear, fullgraph=True)


def _drop_subclass_cache_key_warning(record: logging.LogRecord) -> bool:
    # torch >= 2.14 cannot pickle a Float8Tensor into inductor's on-disk cache key and logs a 50-line traceback
    # per compile; the compile itself goes on uncached (recompiled in each process)
    return record.getMessage() != "Failed to pickle cache key"


def _torchao_call(x, weight, bias, compiled: bool):
    if not compiled:
        return _torchao_linear(x, weight, bias)
    lead = x.shape[:-1]
    out = _compiled_torchao_linear()(_mark_tokens_dynamic(x.reshape(-1, x.shape[-1])), weight, bias)
    return out.reshape(*lead, weight.shape[0])


def _torchao_forward(self, x):
    """nn.Linear.forward over a float8 weight, its quantize + GEMM compiled."""
    return _torchao_call(x, self.weight, self.bias, compiled=True)


def _project_torchao_qkv(self, x):
    """SelfAttention._project for torchao: q/k/v as one float8 GEMM over the fused [3D, D] weight."""
    return _torchao_call(x, self._ao_qkv_weight, self._ao_qkv_bias, self._ao_compiled).chunk(3, dim=-1)


def quantize_dit_torchao(model: nn.Module, granularity: str = "row", *, include: str = HOT_LINEARS,
                         compiled: Optional[bool] = None) -> nn.Module:
    """``quantize_dit`` with torchao's float8 (``Float8DynamicActivationFloat8WeightConfig``): the same linears
    (``include``; the fused q/k/v as one GEMM) get e4m3 weights as torchao ``Float8Tensor``s, and activations
    are quantized per call, per token ("row") or per tensor, by torchao. The modules stay ``nn.Linear``.
    compiled: torch.compile each linear's quantize + GEMM (default: on CUDA). In place; returns ``model``."""
    ao = import_torchao_quantization()
    grans = {"row": ao.PerRow, "tensor": ao.PerTensor}
    if granularity not in grans:
        raise ValueError(f"FP8 granularity {granularity!r}: expected one of {sorted(grans)}")
    _check_one_kernel(model, "torchao")
    p = next(model.parameters())
    reason = torchao_fp8_unsupported(p.device)
    if reason is not None:
        raise RuntimeError(f"dit_precision=fp8 with fp8_kernel=torchao: {reason}; use fp8_kernel=ours")
    hot = _hot_linears(model, include)
    dtypes = {str(m.weight.dtype).replace("torch.", "") for m in hot.values()}
    if dtypes - {"bfloat16"}:
        raise ValueError(f"fp8_kernel=torchao needs a bfloat16 DiT (torchao's per-row float8 takes bf16 weights), "
                         f"got {', '.join(sorted(dtypes))}: set dtype=bfloat16 or use fp8_kernel=ours")
    # activation_value_lb: torchao's scale is amax / 448 with no floor, so an all-zero token would be 0 / 0 = NaN;
    # EPS as ours. set_inductor_config=False: leave torch.compile's global settings to the engine.
    config = ao.Float8DynamicActivationFloat8WeightConfig(granularity=grans[granularity](), activation_value_lb=EPS,
                                                          set_inductor_config=False)
    compiled = p.device.type == "cuda" if compiled is None else compiled
    swapped = []
    for name, attn in _fusable_attentions(model, hot):
        lins = [hot.pop(f"{name}.{c}") for c in "qkv"]
        fused = nn.Linear(lins[0].in_features, 3 * lins[0].out_features, bias=lins[0].bias is not None,
                          device=p.device, dtype=lins[0].weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in lins]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in lins]))
        ao.quantize_(fused, config)
        attn.__dict__.pop("_fused", None)  # the bf16 fused copy: free it
        # q/k/v: row slices of the fused Float8Tensor (its data and scales, no copy), so that q(x) alone still works
        d = lins[0].out_features
        for i, lin in enumerate(lins):
            lin.weight = nn.Parameter(fused.weight[i * d:(i + 1) * d], requires_grad=False)
            if fused.bias is not None:
                lin.bias = nn.Parameter(fused.bias.data[i * d:(i + 1) * d], requires_grad=False)
        # Non-persistent buffers: moved by .to(), absent from the state dict (q/k/v.* hold the same data).
        attn.register_buffer("_ao_qkv_weight", fused.weight.detach(), persistent=False)
        attn.register_buffer("_ao_qkv_bias", None if fused.bias is None else fused.bias.detach(), persistent=False)
        attn._ao_compiled = compiled
        attn._project = types.MethodType(_project_torchao_qkv, attn)
        swapped += lins
    ao.quantize_(model, config, filter_fn=lambda m, fqn: fqn in hot)
    swapped += hot.values()
    left = [n for n, m in hot.items() if not isinstance(m.weight, ao.Float8Tensor)]
    if left:  # torchao skips shapes it cannot multiply without saying so
        raise RuntimeError(f"torchao left {len(left)} linears unquantized: {left[:3]}")
    for lin in swapped:
        if lin.bias is not None:
            lin.bias.requires_grad_(False)  # inference weights (as ours): no autograd graph around _scaled_mm
        if compiled:
            lin.forward = types.MethodType(_torchao_forward, lin)
    model.dit_precision, model.fp8_kernel = "fp8", "torchao"
    return model


# ------------------------------------------------------------------ config: dit_precision, fp8_kernel, fp8_granularity
PRECISIONS = ("bf16", "fp8")  # bf16 = the model's own dtype (bf16 on GPU, fp32 on CPU): nothing to do
FP8_KERNELS: dict[str, Callable[..., nn.Module]] = {"ours": quantize_dit, "torchao": quantize_dit_torchao}
FP8_GRANULARITIES = ("row", "tensor")


def dit_precision_step(precision: str, fp8_kernel: str = "ours", fp8_granularity: str = "row") \
        -> Callable[[nn.Module], nn.Module]:
    """``conf/base.yaml: dit_precision, fp8_kernel, fp8_granularity`` as the function to apply to a loaded DiT,
    checked (names, torchao importable) before any model is built."""
    if precision not in PRECISIONS:
        raise ValueError(f"dit_precision={precision!r}: expected one of {list(PRECISIONS)}")
    if fp8_kernel not in FP8_KERNELS:
        raise ValueError(f"fp8_kernel={fp8_kernel!r}: expected one of {list(FP8_KERNELS)}")
    if fp8_granularity not in FP8_GRANULARITIES:
        raise ValueError(f"fp8_granularity={fp8_granularity!r}: expected one of {list(FP8_GRANULARITIES)}")
    if precision == "bf16":
        return lambda model: model
    if fp8_kernel == "torchao":
        import_torchao_quantization()
    return functools.partial(FP8_KERNELS[fp8_kernel], granularity=fp8_granularity)


def apply_dit_precision(model: nn.Module, precision: str, fp8_kernel: str = "ours",
                        fp8_granularity: str = "row") -> nn.Module:
    """``conf/base.yaml: dit_precision`` (with ``fp8_kernel``, ``fp8_granularity``) applied to a loaded DiT."""
    return dit_precision_step(precision, fp8_kernel, fp8_granularity)(model)
