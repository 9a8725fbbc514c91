"""Attention backends: the CPU SDPA path against float64, the CUDA kernel order, CUDA-only and optional
backends failing with clear reasons, and FlashAttention-4's call glue (with a stand-in module)."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from sdv2_lab.backbones import attention as A
from sdv2_lab.backbones.attention import available_attention_backends, get_attention


def reference(q, k, v, kv_lens=None):
    """float64 softmax(q k^T / sqrt(d)) v over the valid keys; layout [B, L, H, D]."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if kv_lens is not None:
        s = s.masked_fill(~A._key_mask(kv_lens, k.shape[2]), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def qkv(b=3, lq=24, lk=40, h=2, d=32, dtype=torch.float32):
    return (torch.randn(b, lq, h, d, dtype=dtype), torch.randn(b, lk, h, d, dtype=dtype),
            torch.randn(b, lk, h, d, dtype=dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_on_cpu_against_float64(dtype, tol, masked):
    q, k, v = qkv(dtype=dtype)
    lens = torch.tensor([40, 17, 1]) if masked else None
    out = get_attention("sdpa").attend(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == dtype
    ref = reference(q, k, v, lens)
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    # CPU behaviour is what it was: fp32 SDPA on upcast inputs, no kernel selection
    expect = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                            attn_mask=None if lens is None else A._key_mask(lens, 40))
    assert torch.equal(out, expect.transpose(1, 2).to(dtype))


def test_cuda_kernel_order():
    assert A.sdpa_order() == [A.SDPA_KERNELS[n] for n in A.SDPA_CUDA_ORDER]
    assert A.SDPA_CUDA_ORDER[0] == "cudnn"  # measured fastest at the cache shapes (results/attention_h200.md)
    for order in (A.SDPA_CUDA_ORDER, A.SDPA_CAPTURE_ORDER):
        assert sorted(order) == sorted(A.SDPA_KERNELS)  # every kernel stays reachable (masks, fp32)
    # while capturing a CUDA graph (always after the key's eager call): the same order, unless told otherwise
    assert A.SDPA_CAPTURE_ORDER == A.SDPA_CUDA_ORDER == A.capture_order(None) == A.capture_order("cudnn")
    assert A.capture_order("flash").index("cudnn") > A.capture_order("flash").index("math")  # torch's: never cuDNN
    with pytest.raises(ValueError, match="SDV2_SDPA_CAPTURE='fa3': expected cudnn"):
        A.capture_order("fa3")
    for first in ("cudnn", "flash", "efficient"):
        order = A.sdpa_order(first)
        assert order[0] == A.SDPA_KERNELS[first] and sorted(order, key=int) == sorted(A.sdpa_order(), key=int)
    full = A._priority(A.sdpa_order())
    assert full[:4] == [int(b) for b in A.sdpa_order()] and sorted(full) == sorted(torch._C._get_sdp_priority_order())
    fn = A.get_attention("sdpa").attend  # the registered partial carries both orders
    assert fn.keywords["order"][0] == int(SDPBackend.CUDNN_ATTENTION)
    assert fn.keywords["capture_order"][0] == int(SDPBackend.CUDNN_ATTENTION)
    assert A.ATTENTION.get("sdpa_efficient").attend.keywords["capture_order"][0] == int(SDPBackend.EFFICIENT_ATTENTION)


def test_capture_order_flash_keeps_cudnn_out_of_captures(monkeypatch):
    monkeypatch.setattr(A, "SDPA_CAPTURE_ORDER", A.capture_order("flash"))
    for first, expect in ((None, SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        fn = A._sdpa_backend(first)
        assert fn.keywords["capture_order"][0] == int(expect)
        assert fn.keywords["order"][0] == int(A.SDPA_KERNELS[first or "cudnn"])


def test_with_sdpa_priority_sets_and_restores():
    before = torch._C._get_sdp_priority_order()
    wanted = A._priority(A.sdpa_order("cudnn"))
    assert wanted != before  # torch's default never puts cuDNN first
    assert A.with_sdpa_priority(wanted, torch._C._get_sdp_priority_order) == wanted
    assert torch._C._get_sdp_priority_order() == before
    with pytest.raises(ZeroDivisionError):
        A.with_sdpa_priority(wanted, lambda: 1 / 0)
    assert torch._C._get_sdp_priority_order() == before  # restored on errors too


def test_cuda_only_sdpa_variants_say_why():
    for name in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient"):
        if torch.cuda.is_available():
            assert name in available_attention_backends()
        else:
            assert name not in available_attention_backends()
            with pytest.raises(RuntimeError, match=f"{name}.*needs a CUDA device"):
                get_attention(name)


def test_flex_matches_sdpa_on_cpu():
    q, k, v = qkv()
    lens = torch.tensor([40, 25, 8])
    for kv_lens in (None, lens):
        a = get_attention("flex").attend(q, k, v, kv_lens)
        b = get_attention("sdpa").attend(q, k, v, kv_lens)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fa4_missing_is_a_clear_error(monkeypatch):
    if not torch.cuda.is_available():  # this machine: not installed, or no Hopper GPU; either way a reason
        assert "fa4" not in available_attention_backends()
        with pytest.raises(RuntimeError, match="fa4.*(flash-attn-4|FlashAttention-4)"):
            get_attention("fa4")
    monkeypatch.setattr(A, "_fa4_module", lambda: (None, "ModuleNotFoundError: No module named 'flash_attn'"))
    with pytest.raises(RuntimeError, match=r"flash-attn-4 is not installed.*pip install flash-attn-4"):
        get_attention("fa4")


def test_fa4_call_glue(monkeypatch):
    calls = []

    def dense(q, k, v):
        calls.append(("dense", None))
        return reference(q, k, v).to(q.dtype), None  # (out, lse) as flash-attn-4 returns

    def varlen(q, k, v, seqused_k=None):
        calls.append(("varlen", seqused_k))
        return reference(q, k, v, seqused_k.long()).to(q.dtype), None

    monkeypatch.setattr(A, "_fa4_module", lambda: (types.SimpleNamespace(flash_attn_func=dense,
                                                                          flash_attn_varlen_func=varlen), None))
    q, k, v = qkv()
    torch.testing.assert_close(A.fa4_attention(q, k, v), reference(q, k, v).float())
    lens = torch.tensor([40, 3, 9])
    torch.testing.assert_close(A.fa4_attention(q, k, v, lens), reference(q, k, v, lens).float())
    assert calls[0] == ("dense", None) and calls[1][0] == "varlen" and calls[1][1].dtype == torch.int32
