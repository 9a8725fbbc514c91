"""fp8_kernel=torchao: torchao's float8 (``Float8DynamicActivationFloat8WeightConfig``) on the DiT's hot linears.

torchao 0.18 refuses a CPU at quantize time (``_check_hardware_support``: CUDA >= 8.9, MI300+ or XPU), but its
quantization and its GEMM (``torch._scaled_mm``) run on a CPU with torch 2.14. The ``torchao_on_cpu`` fixture
lifts that gate (torchao's and ours) so that torchao's own code, numerics included, runs here; the gate itself
is checked without it. The CUDA path (kernels, CUDA-graph replays) is measured by ``experiments/bench_fp8.py``.
CI installs torchao (``.ci/install``, --no-deps), so none of this is skipped there.
"""
import sys

import pytest
import torch
import torch.nn as nn

from sdv2_lab.backbones import fp8
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.fp8 import EPS, Fp8Linear, dit_precision_step, quantize_dit, quantize_dit_torchao
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from test_fp8 import stream  # the same stream of velocities as the kernel of ours is checked over

import torchao.quantization as ao  # a CI requirement (.ci/install): no skip, an ImportError fails this file
from torchao.quantization import Float8Tensor

TINY = WanDiTConfig(name="tiny", dim=256, ffn_dim=512, num_heads=2, num_layers=2)
H, W = 64, 96
HOT = {f"blocks.{i}.{n}" for i in range(2) for n in
       ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")}
GRANULARITY = {"row": ao.PerRow(), "tensor": ao.PerTensor()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def torchao_on_cpu(monkeypatch):
    """torchao's hardware gate lifted (its own, and ours that mirrors it): its code then runs on this CPU."""
    import torchao.quantization.quant_api as quant_api
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularities: None)
    monkeypatch.setattr(fp8, "torchao_fp8_unsupported", lambda device: None)


def tiny(dtype=torch.bfloat16, seed=0):
    """The tiny DiT initialised in fp32, then cast: the same weights in every dtype."""
    return load_backbone(TINY, "dummy", device="cpu", dtype=torch.float32, seed=seed).to(dtype)


def linear_module(lin: nn.Linear) -> nn.Module:
    m = nn.Module()
    m.lin = nn.Linear(lin.in_features, lin.out_features, dtype=lin.weight.dtype)
    m.lin.load_state_dict(lin.state_dict())
    return m


def float8_names(model):
    return {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor)}


# ------------------------------------------------------------------ config and errors (no gate lifted)
def test_missing_torchao_is_a_one_line_error_naming_the_install(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    with pytest.raises(ImportError) as err:
        dit_precision_step("fp8", "torchao")  # before any model is built
    assert str(err.value) == ("fp8_kernel=torchao needs the torchao package: pip install --no-deps torchao==0.18.0")
    assert callable(dit_precision_step("fp8", "ours")) and callable(dit_precision_step("bf16", "torchao"))


def test_config_names_are_checked():
    with pytest.raises(ValueError, match=r"fp8_kernel='tensorrt': expected one of \['ours', 'torchao'\]"):
        dit_precision_step("fp8", "tensorrt")
    with pytest.raises(ValueError, match=r"fp8_granularity='block': expected one of \['row', 'tensor'\]"):
        dit_precision_step("fp8", "torchao", "block")
    with pytest.raises(ValueError, match=r"dit_precision='fp16'"):
        dit_precision_step("fp16")
    model = tiny()
    assert dit_precision_step("bf16", "torchao")(model) is model and not float8_names(model)


def test_base_config_defaults():
    from sdv2_lab.build import compose_config
    cfg = compose_config("config")
    assert (cfg.dit_precision, cfg.fp8_kernel, cfg.fp8_granularity) == ("bf16", "ours", "row")


def test_torchao_refuses_a_cpu_and_an_old_gpu_with_the_way_out(monkeypatch):
    with pytest.raises(RuntimeError, match=r"fp8_kernel=torchao: .*CUDA \(compute capability >= 8\.9\), not on cpu; "
                                           r"use fp8_kernel=ours"):
        quantize_dit_torchao(tiny())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "8.9" in fp8.torchao_fp8_unsupported("cuda") and "A100" in fp8.torchao_fp8_unsupported("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.torchao_fp8_unsupported("cuda") is None


def test_torchao_needs_a_bf16_dit(torchao_on_cpu):
    with pytest.raises(ValueError, match="needs a bfloat16 DiT .* got float32: set dtype=bfloat16"):
        quantize_dit_torchao(tiny(torch.float32))


def test_one_kernel_per_model(torchao_on_cpu):
    with pytest.raises(ValueError, match="already quantized with fp8_kernel=ours"):
        quantize_dit_torchao(quantize_dit(tiny()))
    with pytest.raises(ValueError, match="already quantized with fp8_kernel=torchao"):
        quantize_dit(quantize_dit_torchao(tiny()))


# ------------------------------------------------------------------ the module swap
def test_the_same_hot_linears_as_ours_with_the_fused_qkv_one_float8_tensor(torchao_on_cpu):
    model = tiny()
    keys = set(model.state_dict())
    quantize_dit_torchao(model)
    assert float8_names(model) == HOT == fp8_names_of_ours()
    cold = ("blocks.0.cross_attn.k", "blocks.0.cross_attn.v", "text_embedding.0", "time_projection.1", "head.head")
    assert all(type(model.get_submodule(n).weight) is nn.Parameter for n in cold)
    assert set(model.state_dict()) == keys  # no new keys: the fused weight is a non-persistent buffer
    for blk in model.blocks:
        attn = blk.self_attn
        assert not hasattr(attn, "_fused")  # the bf16 fused copy is freed
        fused = attn._ao_qkv_weight
        assert isinstance(fused, Float8Tensor) and fused.shape == (768, 256)
        for i, lin in enumerate((attn.q, attn.k, attn.v)):  # row slices of the fused data and scales, no copy
            assert lin.weight.qdata.data_ptr() == fused.qdata[i * 256:].data_ptr()
            assert lin.weight.scale.data_ptr() == fused.scale[i * 256:].data_ptr()
    assert (model.dit_precision, model.fp8_kernel) == ("fp8", "torchao")
    quantize_dit_torchao(model)  # idempotent
    assert float8_names(model) == HOT and set(model.state_dict()) == keys


def fp8_names_of_ours():
    return {n for n, m in quantize_dit(tiny(torch.float32)).named_modules() if isinstance(m, Fp8Linear)}


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fused_qkv_is_one_gemm_equal_to_separate_projections(torchao_on_cpu, monkeypatch, granularity):
    model = quantize_dit_torchao(tiny(), granularity)
    gemms = []  # the [K, N] operand of every torch._scaled_mm torchao calls
    real = torch._scaled_mm

    def counted(a, b, *args, **kw):
        gemms.append(tuple(b.shape))
        return real(a, b, *args, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", counted)
    fused = stream(model, 2)
    assert gemms.count((256, 768)) == 2 * 2  # 2 blocks x 2 chunks: q/k/v as one [D, 3D] GEMM
    assert gemms.count((256, 256)) == 3 * 2 * 2  # self o, cross q, cross o: q/k/v never alone
    assert len(gemms) == 2 * 2 * 6  # and the FFN's two: 6 FP8 GEMMs per block and chunk
    for blk in model.blocks:  # back to three GEMMs over the fused tensor's row slices
        del blk.self_attn._project
    separate = stream(model, 2)
    for x, y in zip(fused, separate):
        assert rel(x, y) < 1e-6


# ------------------------------------------------------------------ numerics (torchao's code on this CPU)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_torchao_linear_against_float64_and_ours(torchao_on_cpu, granularity):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384).to(torch.bfloat16)
    x = torch.randn(3, 50, 256).to(torch.bfloat16)
    m = quantize_dit_torchao(linear_module(lin), granularity, include="lin", compiled=False)
    out = m.lin(x)
    assert out.shape == (3, 50, 384) and out.dtype == torch.bfloat16
    w = m.lin.weight
    assert w.qdata.dtype == torch.float8_e4m3fn and w.scale.shape == ((384, 1) if granularity == "row" else (1, 1))
    # 1) the GEMM is exact for its FP8 operands (torchao's own activation quantization): bf16 output rounding only
    xq = Float8Tensor.from_hp(x.reshape(-1, 256), granularity=GRANULARITY[granularity], hp_value_lb=EPS)
    ref_q = (xq.qdata.double() * xq.scale.double()) @ (w.qdata.double() * w.scale.double()).t() + lin.bias.double()
    assert rel(out.reshape(-1, 384), ref_q) < 4e-3  # 2**-9 per element at most; measured 1.7e-3
    # 2) against the exact linear: e4m3 rounding of both operands, as ours (measured 3.6-3.7 % for both)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    ours = Fp8Linear.from_weight(lin.weight, lin.bias, granularity)(x)
    err_ao, err_ours = rel(out, ref), rel(ours, ref)
    assert 5e-3 < err_ao < 0.05 and 5e-3 < err_ours < 0.05
    assert abs(err_ao - err_ours) < 0.1 * err_ours  # the same rounding error, not just the same order
    # torchao rounds its scales through bf16 (amax / 448 in the input dtype): a few codes differ from ours
    assert rel(out, ours) < 0.03


def test_an_all_zero_token_gives_the_bias_not_nan(torchao_on_cpu):
    # torchao's scale is amax / 448 with no floor (0 / 0 = NaN); activation_value_lb=EPS floors it as ours does
    lin = nn.Linear(256, 128).to(torch.bfloat16)
    m = quantize_dit_torchao(linear_module(lin), "row", include="lin", compiled=False)
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    x[1] = torch.randn(256)
    out = m.lin(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[[0, 2, 3]], lin.bias.detach().expand(3, -1))


def test_compiled_quantize_and_gemm_agrees_with_eager(torchao_on_cpu):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384).to(torch.bfloat16)
    eager = quantize_dit_torchao(linear_module(lin), "row", include="lin", compiled=False)
    compiled = quantize_dit_torchao(linear_module(lin), "row", include="lin", compiled=True)
    assert compiled.lin.forward.__func__ is fp8._torchao_forward
    for tokens in (50, 37):  # a second token count reuses the dynamic compile
        x = torch.randn(tokens, 256).to(torch.bfloat16)
        ref = x.double() @ lin.weight.double().t() + lin.bias.double()
        with torch.no_grad():
            a, b = compiled.lin(x), eager.lin(x)
        # inductor computes the bf16 amax / 448 in fp32: a few e4m3 codes differ (measured 0-1.5 %)
        assert rel(a, b) < 0.03 and 5e-3 < rel(a, ref) < 0.05


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_torchao_stream_error_against_float64_and_ours(torchao_on_cpu, granularity):
    ref = stream(tiny(torch.float64), 10)  # the same weights in float64
    bf16 = stream(tiny(), 10)
    ours = stream(quantize_dit(tiny(), granularity), 10)
    quant = stream(quantize_dit_torchao(tiny(), granularity), 10)
    for r, b, o, q in zip(ref, bf16, ours, quant):
        assert torch.isfinite(q).all()
        assert rel(b, r) < 2e-2  # bf16 itself (measured ~0.5 %)
        assert 2e-3 < rel(q, r) < 0.05 and 2e-3 < rel(o, r) < 0.05  # FP8 linears: a few percent, no drift
        assert rel(q, o) < 0.03  # torchao and ours: the same quantization up to scale rounding
    errs = [rel(q, r) for q, r in zip(quant, ref)]
    assert max(errs[5:]) < 2 * max(errs[:5])  # the cache carries FP8 keys, error does not grow over the stream


def test_build_pipeline_applies_fp8_kernel_torchao(torchao_on_cpu):
    from sdv2_lab.build import build_pipeline, compose_config
    pipe = build_pipeline(compose_config("config", ["dit_precision=fp8", "fp8_kernel=torchao",
                                                    "fp8_granularity=tensor", "dtype=bfloat16"]))
    w = pipe.dit.blocks[0].ffn[0].weight
    assert isinstance(w, Float8Tensor) and w.scale.shape == (1, 1)
    assert pipe.dit.fp8_kernel == "torchao"
