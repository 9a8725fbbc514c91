"""The Wan VAE's fused path (``sdv2_lab/vae/wan_fused.py``, ``fused_ops.py``) on CPU, against the eager module
(itself tested against the reference wheel in ``test_wan_vae.py``) and against float64 formulas.

Tolerances (float32): the fused norm vs the plain float64 formula: relative L2 <= 1e-6 (observed ~1e-7); the
sub-pixel upsample conv vs upsample-then-conv and the whole fused stream vs eager, chunk by chunk:
relative L2 <= 1e-5 (observed ~1e-6: the same arithmetic in another order). The Triton kernel runs in
Triton's CPU interpreter (``TRITON_INTERPRET=1``), which rounds to bfloat16 by truncation: its bf16 check
is loose (2e-2); float32 is tight.
"""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sdv2_lab.vae import build_vae, fused_ops
from sdv2_lab.vae.wan_fused import FusedWan, install_fused, subpixel_weights
from sdv2_lab.vae.wan_builder import use_fused
from sdv2_lab.vae.wan_vae import load_wan_vae

DIM, H, W = 16, 32, 48
CL3 = torch.channels_last_3d


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def plain_norm_silu(x, gamma, add=None, silu=True, bias=None):
    """The reference formula in float64: F.normalize over channels * sqrt(C) * gamma, then SiLU."""
    s = x.double() if add is None else x.double() + add.double()
    if bias is not None:
        s = s + bias.double().reshape(1, -1, 1, 1, 1)
    y = F.normalize(s, dim=1) * math.sqrt(x.shape[1]) * gamma.double().reshape(1, -1, 1, 1, 1)
    return F.silu(y) if silu else y


def rand(*shape, seed, dtype=torch.float32, cl=True):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=CL3) if cl else x


def check_norm(impl, dtype, tol):
    b, c, t, h, w = 2, 24, 3, 5, 7
    x, add = rand(b, c, t, h, w, seed=1, dtype=dtype), rand(b, c, t, h, w, seed=2, dtype=dtype, cl=False)
    gamma = rand(c, 1, 1, 1, seed=3, dtype=dtype, cl=False)
    bias = rand(c, seed=5, dtype=dtype, cl=False)   # a producing conv's deferred bias
    for with_add, with_bias in ((False, False), (True, False), (False, True), (True, True)):
        for silu in (False, True):
            # write into the tail of a padded history buffer; the head (history) must stay untouched
            buf = torch.full((b, c, 2 + t, h, w), float("nan"), dtype=dtype).contiguous(memory_format=CL3)
            s = torch.full_like(x, float("nan"))
            a, bb = add if with_add else None, bias if with_bias else None
            fused_ops.rms_norm_silu(x, gamma, add=a, bias=bb, out=buf[:, :, 2:],
                                    sum_out=s if with_add or with_bias else None, silu=silu, impl=impl)
            assert torch.isnan(buf[:, :, :2]).all()
            assert rel(buf[:, :, 2:], plain_norm_silu(x, gamma, a, silu, bb)) <= tol
            if with_add or with_bias:
                want = x.double() + (0 if a is None else a.double()) + \
                    (0 if bb is None else bb.double().reshape(1, -1, 1, 1, 1))
                assert rel(s, want) <= tol
            # the stream's history (the output's last 2 frames) written as the output is
            tail = torch.full((b, c, 2, h, w), float("nan"), dtype=dtype).contiguous(memory_format=CL3)
            again = torch.empty_like(buf)
            fused_ops.rms_norm_silu(x, gamma, add=a, bias=bb, out=again[:, :, 2:], tail=tail, silu=silu, impl=impl)
            torch.testing.assert_close(tail, again[:, :, -2:], rtol=0, atol=0)


def test_fused_norm_cpu_fallback_equals_float64_formula():
    check_norm("torch", torch.float32, 1e-6)
    y = fused_ops.rms_norm_silu(rand(1, 8, 2, 3, 4, seed=4), torch.ones(8))  # allocates its output
    assert y.is_contiguous(memory_format=CL3) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="impl"):
        fused_ops.rms_norm_silu(rand(1, 8, 2, 3, 4, seed=4), torch.ones(8), impl="cuda")
    with pytest.raises(ValueError, match="shape"):
        fused_ops.rms_norm_silu(rand(1, 8, 2, 3, 4, seed=4), torch.ones(8), add=torch.zeros(1, 8, 2, 3, 5))
    with pytest.raises(ValueError, match="bias has 7 values for 8 channels"):
        fused_ops.rms_norm_silu(rand(1, 8, 2, 3, 4, seed=4), torch.ones(8), bias=torch.zeros(7))
    with pytest.raises(ValueError, match="cannot hold the last frames"):
        fused_ops.rms_norm_silu(rand(1, 8, 2, 3, 4, seed=4), torch.ones(8), tail=torch.zeros(1, 8, 3, 3, 4))


def test_row_strides_decide_what_the_kernel_takes():
    """The kernel walks rows = (b, T*H*W); views whose T, H, W dims do not collapse go to the torch path."""
    from sdv2_lab.vae.fused_ops import _row_strides
    buf = torch.empty(2, 96, 6, 5, 7, memory_format=CL3)
    assert _row_strides(buf[:, :, 2:]) == (6 * 5 * 7 * 96, 96, 1)  # the tail of a padded history buffer
    assert _row_strides(torch.empty(2, 96, 4, 5, 7)) == (96 * 140, 1, 140)  # plain NCDHW
    assert _row_strides(torch.empty(1, 8, 1, 1, 1)) == (8, 1, 1)
    assert _row_strides(torch.empty(2, 96, 4, 6, 8, memory_format=CL3)[..., :5, :7]) is None  # padded interior
    assert not fused_ops.triton_ok(buf)  # CPU tensors: the torch path


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter in a child process (the interpreter must be on
    before Triton is imported): against the float64 formula, and the whole fused stream against eager
    on real strides and channel counts (``interpreter_checks`` below)."""
    pytest.importorskip("triton", reason="Triton is not installed: the kernel cannot run here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "interpreter checks passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def interpreter_checks():
    check_norm("triton", torch.float32, 1e-6)
    check_norm("triton", torch.bfloat16, 2e-2)
    vae = make_eager()
    fused = install_fused(copy.deepcopy(vae), norm_impl="triton")
    want, got = stream(vae, 7, (2, 1)), stream(fused, 7, (2, 1))
    for a, b in zip(want[0][:2] + want[1], got[0][:2] + got[1]):
        assert rel(b, a) <= 1e-5, rel(b, a)
    print("interpreter checks passed")


def test_subpixel_upsample_conv_equals_upsample_then_conv():
    conv = torch.nn.Conv2d(12, 6, 3, padding=1)
    x = rand(3, 12, 5, 7, seed=5, cl=False)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    w, b = subpixel_weights(conv.weight, conv.bias)
    y = F.conv2d(x, w, b, padding=1)  # [N, (a, b, Co), h, w] -> interleave the phases
    got = y.unflatten(1, (2, 2, 6)).permute(0, 3, 4, 1, 5, 2).reshape(3, 6, 10, 14)
    assert rel(got, expected) <= 1e-5


def make_eager():
    torch.manual_seed(0)
    vae = load_wan_vae(dummy=True, dim=DIM)
    with torch.no_grad():  # every path carries signal
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.fixture(scope="module")
def eager():
    return make_eager()


def stream(vae, seed, latent_sizes=(2, 1, 1, 2, 1)):
    """Encode a 1 + 4k-frame clip chunk by chunk (5 frames, then 4), decode latents in chunks of the given
    sizes (a chunk-size change re-makes the fused buffers, carrying the history over)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(1, 3, 1 + 4 * 4, H, W, generator=g) * 2 - 1
    z = torch.randn(1, sum(latent_sizes), 16, H // 8, W // 8, generator=g)
    s = vae.new_state()
    enc = [vae.encode(s, video[:, :, :5])] + [vae.encode(s, video[:, :, 1 + 4 * c:5 + 4 * c]) for c in range(1, 4)]
    dec, i = [], 0
    for n in latent_sizes:
        dec.append(vae.decode(s, z[:, i:i + n]))
        i += n
    return enc, dec


@pytest.mark.parametrize("options", [{}, {"fuse_upsample": False, "pad_rgb": False}, {"defer_bias": False}])
def test_fused_stream_equals_eager(eager, options):
    fused = install_fused(copy.deepcopy(eager), **options)
    assert isinstance(fused.fused, FusedWan) and fused._steps["decode"] == fused.fused.decode_step
    want, got = stream(eager, 6), stream(fused, 6)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        assert a.shape == b.shape
        assert rel(b, a) <= 1e-5
    assert [d.shape[1] for d in got[1]] == [5, 4, 4, 8, 4]


def test_fused_state_is_the_history_only(eager):
    """A stream keeps its history tensors and nothing else: the fused path's padded buffers are the call's
    workspace, so a fused stream holds exactly the bytes an eager one does (channels-last after its first
    fused call, so that the copies in and out keep one layout)."""
    from sdv2_lab.vae.state import state_nbytes
    fused = install_fused(copy.deepcopy(eager))
    s, e = fused.new_state(), eager.new_state()
    for vae, st in ((fused, s), (eager, e)):
        vae.encode(st, torch.zeros(1, 3, 5, H, W))
        vae.encode(st, torch.zeros(1, 3, 4, H, W))
        vae.decode(st, torch.zeros(1, 2, 16, H // 8, W // 8))
        vae.decode(st, torch.zeros(1, 1, 16, H // 8, W // 8))
    assert set(vars(s.enc)) == set(vars(e.enc)) and set(s.enc.history) == set(e.enc.history)
    assert {k: v.shape for k, v in s.dec.history.items()} == {k: v.shape for k, v in e.dec.history.items()}
    assert state_nbytes(s) == state_nbytes(e) > 0
    assert all(h.is_contiguous(memory_format=CL3) for h in s.dec.history.values() if h.shape[1] > 1)
    assert fused.encoder.conv1.weight.is_contiguous(memory_format=CL3)  # weights converted once, in place


def test_fused_batch_of_two_equals_two_streams(eager):
    fused = install_fused(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(8)
    v = torch.rand(2, 3, 9, H, W, generator=g) * 2 - 1
    s, s0, s1 = fused.new_state(), eager.new_state(), eager.new_state()
    for sl in (slice(0, 5), slice(5, 9)):
        both = fused.encode(s, v[:, :, sl])
        assert rel(both[:1], eager.encode(s0, v[:1, :, sl])) <= 1e-5
        assert rel(both[1:], eager.encode(s1, v[1:, :, sl])) <= 1e-5


def test_fused_option_resolution(tmp_path):
    assert use_fused("auto", "cpu") is False and use_fused("auto", "cuda") is True
    assert use_fused("auto", "cuda", "compile") is False and use_fused(True, "cpu") is True
    assert use_fused("false", "cuda") is False
    with pytest.raises(ValueError, match="exclude"):
        use_fused(True, "cuda", "compile")
    with pytest.raises(ValueError, match="true, false or auto"):
        use_fused("sometimes", "cuda")
    assert not hasattr(build_vae({"name": "wan", "dim": DIM}, dummy=True), "fused")  # auto on CPU: eager
    vae = build_vae({"name": "wan", "dim": DIM, "fused": True}, dummy=True)
    assert isinstance(vae.fused, FusedWan)
    tae = build_vae({"name": "taehv", "dim": DIM, "fused": True}, dummy=True)
    assert isinstance(tae.wan.fused, FusedWan)


def test_warmup_runs_a_throwaway_stream(eager):
    fused = install_fused(copy.deepcopy(eager))
    before = stream(fused, 9, (2, 1))
    assert fused.warmup(H, W) > 0
    after = stream(fused, 9, (2, 1))
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


if __name__ == "__main__":  # the child process of test_triton_kernel_in_the_interpreter
    interpreter_checks()
