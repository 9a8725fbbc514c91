"""FP8 (e4m3) DiT linears: quantization math against float64, the FP8 GEMM, the module swap, the config key.

On CPU the GEMM is torch's CPU ``_scaled_mm`` (fp32 accumulation), cross-checked against the dequantize-and-
multiply emulation; the CUDA kernels are checked against the same float64 references by
``experiments/bench_fp8.py`` on the GPU.
"""
import copy

import pytest
import torch
import torch.nn as nn

from sdv2_lab.backbones import fp8
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.fp8 import E4M3, Fp8Linear, apply_dit_precision, dequantize, quantize, quantize_dit
from sdv2_lab.backbones.wan_dit import WanDiTConfig

U = 2.0 ** -4          # e4m3 unit roundoff (3 mantissa bits): relative error bound in the normal range
SUB = 2.0 ** -10       # half the subnormal spacing (2**-9), in units of the scale
TINY = WanDiTConfig(name="tiny", dim=256, ffn_dim=512, num_heads=2, num_layers=2)
H, W = 64, 96


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_quantize_error_bound_against_float64(granularity):
    # rows spanning 6 decades, one outlier: the bound must hold element by element
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    x[5, 7] = 40.0 * x[5].abs().max()
    q, s = quantize(x, granularity)
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert s.shape == ((64, 1) if granularity == "row" else (1, 1))
    err = (dequantize(q, s).double() - x.double()).abs()
    bound = U * x.double().abs() + SUB * s.double() + 2.0 ** -20 * x.double().abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert err.max() > 0  # it did round
    # the amax element of each scaled block maps to 448 and back (fp32 rounding only)
    amax_idx = x.abs().argmax(dim=-1) if granularity == "row" else None
    if granularity == "row":
        picked = x.gather(1, amax_idx[:, None]).double()
        back = dequantize(q, s).gather(1, amax_idx[:, None]).double()
        assert torch.allclose(back, picked, rtol=1e-6, atol=0)


def test_row_scales_keep_small_rows_tensor_scales_flush_them():
    x = torch.randn(4, 128)
    x[0] *= 1e6  # one huge row
    row_err = [rel(dequantize(*quantize(x, "row"))[i], x[i]) for i in range(4)]
    tensor_err = [rel(dequantize(*quantize(x, "tensor"))[i], x[i]) for i in range(4)]
    assert max(row_err) < 0.05
    assert min(tensor_err[1:]) > 0.5  # 1e-6 of the amax is below e4m3's smallest subnormal: flushed


def test_zero_rows_stay_zero():
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    q, s = quantize(x, "row")
    assert torch.isfinite(s).all() and (dequantize(q, s)[[0, 2]] == 0).all()


@pytest.mark.parametrize("gemm", ["scaled_mm", "emulated"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_linear_against_float64(gemm, granularity):
    if gemm == "scaled_mm" and fp8.fp8_gemm_unsupported("cpu"):
        pytest.fail(f"torch {torch.__version__} lost its CPU FP8 GEMM: {fp8.fp8_gemm_unsupported('cpu')}")
    lin = nn.Linear(256, 384)
    x = torch.randn(3, 50, 256)
    m = Fp8Linear.from_weight(lin.weight, lin.bias, granularity, gemm=gemm)
    out = m(x)
    assert out.shape == (3, 50, 384) and out.dtype == torch.float32
    # 1) the GEMM is exact for its FP8 operands: float64 product of the dequantized operands, fp32 accumulation
    xq, xs = quantize(x.reshape(-1, 256), granularity)
    ref_q = dequantize(xq, xs).double() @ dequantize(m.weight, m.weight_scale.t()).double().t() + lin.bias.double()
    assert rel(out.reshape(-1, 384), ref_q) < 1e-6
    # 2) against the exact linear: e4m3 rounding of both operands (rms <= U/sqrt(3) each) -> a few percent
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert 5e-3 < rel(out, ref) < 0.05


def test_fp8_linear_keeps_bf16():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    m = Fp8Linear.from_weight(lin.weight, lin.bias)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    out = m(x)
    assert out.dtype == torch.bfloat16
    assert rel(out, x.double() @ lin.weight.double().t() + lin.bias.double()) < 0.05


def test_compiled_activation_quantizer_is_bitwise_eager():
    fn = fp8._activation_quantizer("row", compiled=True)
    for m in (100, 37):  # a second token count reuses the dynamic compile
        x = torch.randn(m, 256) * 3
        (qc, sc), (qe, se) = fn(x), quantize(x)
        assert torch.equal(qc.view(torch.uint8), qe.view(torch.uint8)) and torch.equal(sc, se)


# ------------------------------------------------------------------ the DiT
def tiny(dtype=torch.float32, seed=0):
    return load_backbone(TINY, "dummy", device="cpu", dtype=dtype, seed=seed)


def stream(model, chunks=8, seed=1):
    """Velocities of a chunks-long stream: a 2-frame first chunk, then 1-frame chunks (KV cache 6, 3 sinks)."""
    dtype = next(model.parameters()).dtype
    dtype = torch.float32 if dtype == E4M3 else dtype
    cache = model.new_cache(1, H, W, 6, 3, 0.2)
    g = torch.Generator().manual_seed(seed)
    model.set_prompt(cache, torch.randn(1, 512, 4096, generator=g).to(dtype))
    s = cache.spec.frame_tokens
    outs = []
    with torch.no_grad():
        for j in range(chunks):
            f = 2 if j == 0 else 1
            x = torch.randn(1, f, 16, H // 8, W // 8, generator=g).to(dtype)
            outs.append(model(x, torch.full((1, f), 700.0, dtype=dtype), cache, [0 if j == 0 else (j + 1) * s]))
    return outs


def fp8_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def test_quantize_dit_swaps_the_per_chunk_linears_and_keeps_names():
    model = tiny()
    keys = set(model.state_dict())
    quantize_dit(model)
    expect = {f"blocks.{i}.{n}" for i in range(2) for n in
              ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")}
    assert fp8_names(model) == expect
    assert all(type(model.get_submodule(n)) is nn.Linear for n in
               ("blocks.0.cross_attn.k", "blocks.0.cross_attn.v", "text_embedding.0", "time_projection.1", "head.head"))
    sd = model.state_dict()
    assert set(sd) == keys | {f"{n}.weight_scale" for n in expect}  # no fused-buffer keys
    assert all(sd[f"{n}.weight"].dtype == E4M3 for n in expect)
    assert not hasattr(model.blocks[0].self_attn, "_fused")  # the bf16 fused q/k/v copy is freed
    quantize_dit(model)  # idempotent
    assert fp8_names(model) == expect and set(model.state_dict()) == set(sd)


def test_fp8_state_dict_round_trips_through_the_fused_views():
    a, b = quantize_dit(tiny(seed=0)), quantize_dit(tiny(seed=1))
    b.load_state_dict(a.state_dict(), strict=True)  # writes through q/k/v views into b's fused buffer
    for x, y in zip(stream(a, 3), stream(b, 3)):
        assert torch.equal(x, y)


def test_fused_qkv_is_one_gemm_and_equals_separate_projections():
    model = quantize_dit(tiny())
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            def counted(x, _q=m._quantize, _n=name):
                calls[_n] = calls.get(_n, 0) + 1
                return _q(x)
            m._quantize = counted
    fused = stream(model, 2)
    for i in range(2):  # 2 chunks: q's quantizer serves the fused GEMM once per chunk, k and v are never called
        assert calls[f"blocks.{i}.self_attn.q"] == 2
        assert f"blocks.{i}.self_attn.k" not in calls and f"blocks.{i}.self_attn.v" not in calls
        assert calls[f"blocks.{i}.ffn.0"] == 2
    for blk in model.blocks:  # back to three GEMMs over the same e4m3 views
        del blk.self_attn._project
    separate = stream(model, 2)
    assert all(f"blocks.{i}.self_attn.k" in calls for i in range(2))
    for x, y in zip(fused, separate):
        assert rel(x, y) < 1e-6


def test_fp8_stream_error_against_float64():
    ref = stream(tiny().double(), 10)  # the same weights in float64 (RoPE phases stay complex64)
    exact = stream(tiny(), 10)
    quant = stream(quantize_dit(tiny()), 10)
    for r, e, q in zip(ref, exact, quant):
        assert rel(e, r) < 1e-5  # the fp32 model agrees with float64
        assert 2e-3 < rel(q, r) < 0.05  # FP8 linears: a few percent per chunk (dummy weights), no drift
    errs = [rel(q, r) for q, r in zip(quant, ref)]
    assert max(errs[5:]) < 2 * max(errs[:5])  # the cache carries FP8 keys, error does not grow over the stream


def test_dit_precision_registry():
    model = tiny()
    assert apply_dit_precision(model, "bf16") is model and not fp8_names(model)
    assert fp8_names(apply_dit_precision(model, "fp8"))
    with pytest.raises(ValueError, match=r"dit_precision='fp16'.*\['bf16', 'fp8'\]"):
        apply_dit_precision(model, "fp16")
    with pytest.raises(ValueError, match="granularity"):
        quantize_dit(tiny(), "block")


def test_build_pipeline_applies_dit_precision():
    from sdv2_lab.build import build_pipeline, compose_config
    pipe = build_pipeline(compose_config("config", ["dit_precision=fp8"]))
    assert isinstance(pipe.dit.blocks[0].ffn[0], Fp8Linear)
    pipe = build_pipeline(compose_config("config"))
    assert not fp8_names(pipe.dit)


def test_cuda_without_fp8_gemms_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = fp8.fp8_gemm_unsupported("cuda")
    assert "8.9" in reason and "A100" in reason
    with pytest.raises(RuntimeError, match="use dit_precision=bf16"):
        fp8._pick_gemm("auto", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_gemm_unsupported("cuda") is None
