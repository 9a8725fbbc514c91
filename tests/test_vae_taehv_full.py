"""TAEHV both ways (``conf/vae/taehv_full*.yaml``: TAEHV's own encoder and decoder, no Wan VAE) as a config:
shapes and frame arithmetic, streaming equal to one-shot, and a V2V pipeline run on CPU.

Tolerance (float32): streamed encode / decode vs TAEHV's one-shot encode / decode of the whole clip:
relative L2 <= 1e-5 (the same ops batched differently; observed ~1e-7).
"""
import logging

import pytest
import torch
from omegaconf import OmegaConf

from sdv2_lab.build import CONF_DIR
from sdv2_lab.vae import build_vae

H, W = 32, 48


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load(name):
    return OmegaConf.load(CONF_DIR / "vae" / f"{name}.yaml")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    v = build_vae(load("taehv_full_tiny"), dummy=True, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # O(1) activations through the whole stack (default init fades out)
        for p in v.parameters():
            p.normal_(0, 1.2 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1)
    return v


def clip(seed, chunks=4):
    return torch.rand(1, 3, 1 + 4 * chunks, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_configs_are_taehv_both_ways():
    for name in ("taehv_full", "taehv_full_tiny"):
        cfg = load(name)
        assert cfg.name == "taehv" and cfg.encoder == "taehv"
    assert load("taehv_full").accelerate == "auto"  # cuda_graph on CUDA


def test_frame_arithmetic_and_round_trip_equals_one_shot(vae):
    """In one latent space (normalize_on_encode=True: the symmetric VAE) a streamed round trip equals TAEHV's
    one-shot encode and decode; with the reference's flags the DiT gets the Wan encoder's raw space."""
    from sdv2_lab.vae import LATENT_MEAN, LATENT_STD
    from sdv2_lab.vae.taehv import TAEHVVAE
    assert vae.wan is None and vae.weights_are_dummy
    assert (vae.latent_space, vae.dit_in, vae.dit_out) == ("normalized", "raw", "normalized")
    mean, std = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)
    reference_flags = vae
    vae = TAEHVVAE(vae.taehv, normalize_on_encode=True)
    video = clip(1)
    state = vae.new_state()
    chunks = [video[:, :, :5]] + [video[:, :, 1 + 4 * c:5 + 4 * c] for c in range(1, 4)]
    lat = [vae.encode(state, c) for c in chunks]
    assert [z.shape[1] for z in lat] == [2, 1, 1, 1]  # 1 + 4k frames -> 1 + k latents, then 4 -> 1
    assert all(z.shape[2:] == (16, H // 8, W // 8) for z in lat)
    frames = [vae.decode(state, z) for z in lat]
    assert [f.shape[1] for f in frames] == [5, 4, 4, 4]  # 2 latents -> 5 frames, then 1 -> 4: frames in = out
    assert all(f.dtype == torch.float32 and f.abs().max() <= 1 for f in frames)
    # one-shot: frame 0 repeated to a group of its own, the whole clip at once; decode trims TAEHV's warm-up
    x = (video * 0.5 + 0.5).transpose(1, 2)
    z = vae.taehv.encode_video(torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1))
    assert rel(torch.cat(lat, 1), z) <= 1e-5
    y = vae.taehv.decode_video(z)[:, vae.taehv.frames_to_trim:].mul(2).sub(1).clamp(-1, 1)
    got = torch.cat(frames, 1)
    assert got.shape == y.shape == (1, 17, 3, H, W)
    assert rel(got, y) <= 1e-5
    raw = reference_flags.encode(reference_flags.new_state(), video[:, :, :5])
    assert rel(raw, z[:, :2] * std + mean) <= 1e-5


def test_bad_chunks_are_errors(vae):
    state = vae.new_state()
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        vae.encode(state, torch.zeros(1, 3, 4, H, W))
    vae.encode(state, torch.zeros(1, 3, 5, H, W))
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(state, torch.zeros(1, 3, 6, H, W))
    with pytest.raises(ValueError, match="unknown TAEHV VAE options"):
        build_vae({"name": "taehv", "encoder": "taehv", "colour": "red"}, dummy=True)
    with pytest.raises(ValueError, match="latent_space"):
        build_vae({"name": "taehv", "encoder": "taehv", "latent_space": "scaled"}, dummy=True)


def test_full_config_on_cpu_runs_eager_with_a_logged_reason(vae, caplog):
    with caplog.at_level(logging.INFO, logger="sdv2_lab.vae.accel"):
        full = build_vae(load("taehv_full"), dummy=True, device="cpu", dtype=torch.float32)
    assert "graphs need a CUDA device" in caplog.text
    full.load_state_dict(vae.state_dict())
    a, b = vae.new_state(), full.new_state()
    for c in (clip(2, 2)[:, :, :5], clip(2, 2)[:, :, 5:9]):
        torch.testing.assert_close(full.decode(b, full.encode(b, c)), vae.decode(a, vae.encode(a, c)), rtol=0, atol=0)


def test_v2v_pipeline_with_taehv_both_ways():
    from sdv2_lab.build import build_pipeline, compose_config
    from sdv2_lab.io.synthetic import synthetic_clip
    torch.manual_seed(0)
    pipe = build_pipeline(compose_config("config", ["device=cpu", f"height={H}", f"width={W}", "vae=taehv_full_tiny",
                                                    "steps=1"]))
    assert pipe.vae.wan is None
    pipe.start("a red square")
    out = torch.cat([pipe.push(synthetic_clip(13, H, W)[0]), pipe.flush()])
    assert out.shape == (13, H, W, 3) and out.min() >= 0 and out.max() <= 1
