"""TAEHV (tiny Wan latent decoder): key layout and one-shot output equal to the reference wheel's TAEHV,
``taew2_1.pth`` loading incl. TGrow trimming, and our stateful streaming decode.

Tolerances (fp32): one-shot decode/encode vs the reference module: relative L2 error <= 1e-5 (same ops in a
different batching). Streaming decode vs one-shot decode of the whole latent sequence: <= 1e-5 over 10 chunks.
"""
import logging

import pytest
import torch
from torch import nn

from sdv2_lab.vae import TAEHV, build_vae, load_taehv
from sdv2_lab.vae.taehv import TAEHVVAE

H, W = 32, 48  # pixels; latents are 4x6
CHUNKS = 10


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Weights with O(1) activations through the whole stack (default init dies out after ~20 convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.2 / fan_in ** 0.5 if p.dim() > 1 else 0.1))
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A ``taew2_1.pth`` in the upstream layout: plain state dict, full-size (x2 time) TGrow weights."""
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save(randomise(TAEHV(), 0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt):
    from models.wan.taehv_wrapper import TAEHV as RefTAEHV
    return RefTAEHV(checkpoint_path=str(ckpt)).eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_taehv(ckpt)


def latents(seed, n=CHUNKS + 1):
    return torch.randn(1, n, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_keys_and_shapes_equal_reference(reference, ours):
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert a == b and any(k.startswith("decoder.22.") for k in a)  # the index layout ComfyUI detects


@pytest.mark.parametrize("parallel", [True, False])
def test_one_shot_decode_and_encode_equal_reference(reference, ours, parallel):
    z = latents(1, 5)
    with torch.no_grad():
        expected = reference.decode_video(z, parallel=parallel)
        got = ours.decode_video(z)
    assert got.shape == expected.shape == (1, 20, 3, H, W)
    assert rel(got, expected) <= 1e-5
    x = torch.rand(1, 8, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(ours.encode_video(x), reference.encode_video(x, parallel=parallel)) <= 1e-5


def test_tgrow_trimming_when_time_upscale_is_off(ckpt):
    """Upstream's ``patch_tgrow_layers``: a x1 TGrow keeps the last rows of the checkpoint's x2 weights."""
    from models.wan.taehv_wrapper import TAEHV as RefTAEHV
    ref = RefTAEHV(checkpoint_path=str(ckpt), decoder_time_upscale=(False, True)).eval()
    ours = load_taehv(ckpt, time_upscale=(False, True))
    full = torch.load(ckpt)
    assert ours.frames_to_trim == 1
    torch.testing.assert_close(ours.decoder[13].conv.weight, full["decoder.13.conv.weight"][-128:], rtol=0, atol=0)
    z = latents(3, 3)
    with torch.no_grad():
        assert rel(ours.decode_video(z), ref.decode_video(z)) <= 1e-5


def test_streaming_decode_equals_one_shot(ours):
    """Per-layer memory carried between chunks: chunk-by-chunk frames = one-shot frames (first 3 trimmed)."""
    vae = TAEHVVAE(ours)
    z = latents(4)
    one_shot = ours.decode_video(z)[:, ours.frames_to_trim:].mul(2).sub(1).clamp(-1, 1)
    state = vae.new_state()
    chunks = [z[:, :2]] + [z[:, c + 1:c + 2] for c in range(1, CHUNKS)]
    out = [vae.decode(state, c) for c in chunks]
    assert [o.shape[1] for o in out] == [5] + [4] * (CHUNKS - 1)  # the Wan VAE's frame arithmetic
    got = torch.cat(out, 1)
    assert got.shape == one_shot.shape
    assert rel(got, one_shot) <= 1e-5


def test_first_chunk_relation_to_reference_wrapper(reference, ours):
    """The reference's wrapper drops all 4 frames of latent 0 (2 latents -> 4 frames): its first chunk is our
    first chunk without our frame 0. Later chunks re-decode 3 latents of context from zero memory, so they
    differ from a true stream (and ours) by a small amount; we only bound that, it is not a target."""
    from types import SimpleNamespace

    from models.wan.taehv_wrapper import TAEHVWanVAEWrapper
    wrapper = TAEHVWanVAEWrapper.__new__(TAEHVWanVAEWrapper)  # no Wan VAE files: only the decode path is used
    nn.Module.__init__(wrapper)
    wrapper.taehv, wrapper.use_tensorrt, wrapper.parallel_decode = reference, False, True
    wrapper.model, wrapper.decode_context_latents = SimpleNamespace(first_encode=True, first_decode=True), 3
    wrapper._decode_latent_cache, wrapper._tensorrt_decoder, wrapper._tensorrt_failed = None, None, False

    vae, z = TAEHVVAE(ours), latents(5, 6)
    state = vae.new_state()
    with torch.no_grad():
        ref0 = wrapper.stream_decode_to_pixel(z[:, :2])
        got0 = vae.decode(state, z[:, :2])
        assert ref0.shape[1] == 4 and got0.shape[1] == 5
        assert rel(got0[:, 1:], ref0) <= 1e-5
        for c in range(2, 6):
            ref_c, got_c = wrapper.stream_decode_to_pixel(z[:, c:c + 1]), vae.decode(state, z[:, c:c + 1])
            assert ref_c.shape == got_c.shape == (1, 4, 3, H, W)
            if c >= 5:  # with >= 3 latents of context the reference window no longer starts at the stream start
                assert rel(got_c, ref_c) > 1e-6


def test_streams_independent(ours):
    vae, a, b = TAEHVVAE(ours), latents(6, 4), latents(7, 4)
    s = vae.new_state()
    alone = [vae.decode(s, a[:, :2]), vae.decode(s, a[:, 2:3]), vae.decode(s, a[:, 3:4])]
    sa, sb = vae.new_state(), vae.new_state()
    mixed = []
    for ca, cb in zip((a[:, :2], a[:, 2:3], a[:, 3:4]), (b[:, :2], b[:, 2:3], b[:, 3:4])):
        vae.decode(sb, cb)
        mixed.append(vae.decode(sa, ca))
    for x, y in zip(alone, mixed):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_taehv_encoder_streaming_equals_one_shot(ours):
    """encoder=taehv: frame 0 repeated into a group of its own; later chunks of 4 frames -> 1 latent each,
    equal to encoding the whole (padded) clip at once. taew2_1.pth's latents are normalised: handed to the DiT
    as they are when it takes normalised latents, de-normalised (z * std + mean) for the reference's DiT, which
    takes the Wan encoder's raw mu (normalize_on_encode=False)."""
    from sdv2_lab.vae import LATENT_MEAN, LATENT_STD
    video = torch.rand(1, 3, 1 + 4 * 4, H, W, generator=torch.Generator().manual_seed(8)) * 2 - 1
    x = (video * 0.5 + 0.5).transpose(1, 2)
    padded = torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1)
    z = ours.encode_video(padded)
    mean, std = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)
    for vae, want in ((TAEHVVAE(ours, normalize_on_encode=True), z), (TAEHVVAE(ours), z * std + mean)):
        state = vae.new_state()
        parts = [vae.encode(state, video[:, :, :5])] + [vae.encode(state, video[:, :, 1 + 4 * c:5 + 4 * c])
                                                          for c in range(1, 4)]
        assert [p.shape[1] for p in parts] == [2, 1, 1, 1]
        # float32: the chunked convolutions sum in another order than the one-shot pass (seen: 1.6e-5 abs).
        torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-4, atol=1e-4)


def test_build_from_conf_with_wan_encoder(ckpt):
    from omegaconf import OmegaConf

    from sdv2_lab.build import CONF_DIR
    cfg = OmegaConf.load(CONF_DIR / "vae" / "taehv_tiny.yaml")
    vae = build_vae(cfg, taehv_path=str(ckpt), dummy=True, device="cpu", dtype=torch.float32)
    assert cfg.name == "taehv" and vae.weights_are_dummy
    state = vae.new_state()
    z = vae.encode(state, torch.zeros(1, 3, 5, H, W))
    assert z.shape == (1, 2, 16, H // 8, W // 8)
    assert vae.decode(state, z).shape == (1, 5, 3, H, W)


def test_bad_input(ckpt, tmp_path, ours):
    bad = torch.load(ckpt)
    del bad["decoder.3.conv.0.weight"]
    bad["decoder.1.weight"] = bad["decoder.1.weight"][:8]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*\n.*missing: decoder\.3\.conv\.0\.weight.*\n.*decoder\.1\.weight"):
        load_taehv(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_taehv(tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="taew2_1.pth"):
        load_taehv(None)
    vae = TAEHVVAE(ours)
    with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
        vae.decode(vae.new_state(), torch.zeros(1, 2, 8, 4, 6))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(vae.new_state(), torch.zeros(1, 3, 4, H, W))
    with pytest.raises(ValueError, match="encoder"):
        build_vae({"name": "taehv", "encoder": "vgg"}, dummy=True)


def test_accelerate_falls_back_with_a_logged_reason_on_cpu(ours, caplog):
    from sdv2_lab.vae.accel import accelerate_vae
    vae = TAEHVVAE(ours)
    with caplog.at_level(logging.INFO, logger="sdv2_lab.vae.accel"):
        accelerate_vae(vae, "cuda_graph")
    assert "needs a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="valid"):
        accelerate_vae(vae, "tensorrt-ish")
