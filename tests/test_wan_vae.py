"""The streaming Wan VAE against the reference ``WanVAE_`` (same random weights) and diffusers, its state
handling, loading rules and input checks. Tiny width (dim 16) at 32x48 pixels.

Tolerance: relative L2 error <= 1e-4 in fp32 for every chunk against the reference (10 chunks: 5 frames,
then 4-frame chunks; 2 latents, then 1 latent per chunk). Observed ~1e-6.
"""
import logging

import pytest
import torch

from sdv2_lab.vae import LATENT_MEAN, LATENT_STD, WanVAE, build_vae, registered_vaes
from sdv2_lab.vae.checkpoints import diffusers_to_wan, read_state_dict

DIM, H, W = 16, 32, 48
CHUNKS = 10
TOL = 1e-4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference_vae():
    from models.wan.wan_base.modules.vae import WanVAE_
    torch.manual_seed(0)
    ref = WanVAE_(dim=DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0).eval()
    with torch.no_grad():  # the reference zero-inits some projections; make every path carry signal
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.fixture(scope="module")
def ckpt(reference_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "Wan2.1_VAE.pth"
    torch.save(reference_vae.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ours(ckpt):
    return build_vae({"name": "wan", "dim": DIM}, wan_folder=str(ckpt.parent), dtype=torch.float32)


def video_chunks(seed, chunks=CHUNKS):
    torch.manual_seed(seed)
    video = torch.randn(1, 3, 1 + 4 * chunks, H, W).clamp(-1, 1)
    return [video[:, :, :5]] + [video[:, :, 1 + 4 * c:5 + 4 * c] for c in range(1, chunks)]


def latent_chunks(seed, chunks=CHUNKS):
    torch.manual_seed(seed)
    z = torch.randn(1, chunks + 1, 16, H // 8, W // 8)
    return [z[:, :2]] + [z[:, c + 1:c + 2] for c in range(1, chunks)]


def test_state_dict_names_and_shapes_equal_reference(reference_vae):
    a = {k: tuple(v.shape) for k, v in WanVAE(dim=DIM).state_dict().items()}
    b = {k: tuple(v.shape) for k, v in reference_vae.state_dict().items()}
    assert a == b


def test_streaming_encode_equals_reference(reference_vae, ours):
    reference_vae.first_encode = True
    state = ours.new_state()
    with torch.no_grad():
        for c, frames in enumerate(video_chunks(1)):
            expected = reference_vae.stream_encode(frames, None).transpose(1, 2)  # [B, F, 16, h, w]
            got = ours.encode(state, frames)
            assert got.shape == expected.shape == (1, 2 if c == 0 else 1, 16, H // 8, W // 8)
            assert rel(got, expected) <= TOL, (c, rel(got, expected))


def test_streaming_decode_equals_reference(reference_vae, ours):
    mean, std = torch.tensor(LATENT_MEAN), torch.tensor(LATENT_STD)
    reference_vae.first_decode = True
    state = ours.new_state()
    with torch.no_grad():
        for c, lat in enumerate(latent_chunks(2)):
            expected = reference_vae.stream_decode(lat.transpose(1, 2), [mean, 1.0 / std]).clamp(-1, 1).transpose(1, 2)
            got = ours.decode(state, lat)
            assert got.dtype == torch.float32 and got.abs().max() <= 1
            assert got.shape == expected.shape == (1, 5 if c == 0 else 4, 3, H, W)
            assert rel(got, expected) <= TOL, (c, rel(got, expected))


def test_bigger_chunks_equal_small_chunks(ours):
    """8 frames in one call = two 4-frame calls; 3 latents in one call = three 1-latent calls."""
    frames = video_chunks(3, 3)
    s1, s2 = ours.new_state(), ours.new_state()
    small = torch.cat([ours.encode(s1, f) for f in frames], 1)
    big = torch.cat([ours.encode(s2, frames[0]), ours.encode(s2, torch.cat(frames[1:], 2))], 1)
    assert rel(big, small) <= 1e-5
    lat = latent_chunks(4, 4)
    s1, s2 = ours.new_state(), ours.new_state()
    small = torch.cat([ours.decode(s1, z) for z in lat], 1)
    big = torch.cat([ours.decode(s2, lat[0]), ours.decode(s2, torch.cat(lat[1:], 1))], 1)
    assert big.shape == (1, 5 + 12, 3, H, W)
    assert rel(big, small) <= 1e-5


def test_channels_last_equals_default(ckpt, ours):
    cl = build_vae({"name": "wan", "dim": DIM, "channels_last": True}, path=str(ckpt))
    frames, lat = video_chunks(5, 3), latent_chunks(6, 3)
    sa, sb = ours.new_state(), cl.new_state()
    for f in frames:
        assert rel(cl.encode(sb, f), ours.encode(sa, f)) <= 1e-5
    sa, sb = ours.new_state(), cl.new_state()
    for z in lat:
        assert rel(cl.decode(sb, z), ours.decode(sa, z)) <= 1e-5


def test_streams_are_independent_and_new_state_resets(ours):
    a, b = video_chunks(7, 3), video_chunks(8, 3)
    s = ours.new_state()
    alone = [ours.encode(s, f) for f in a]
    sa, sb = ours.new_state(), ours.new_state()
    mixed = []
    for fa, fb in zip(a, b):
        ours.encode(sb, fb)
        mixed.append(ours.encode(sa, fa))
    for x, y in zip(alone, mixed):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    fresh = ours.encode(ours.new_state(), a[0])
    torch.testing.assert_close(fresh, alone[0], rtol=0, atol=0)
    # the same latents decoded in a used state differ: the state carries history
    za, zb = latent_chunks(9, 2), latent_chunks(10, 2)
    s1, s2 = ours.new_state(), ours.new_state()
    ours.decode(s1, za[0]), ours.decode(s2, zb[0])
    assert rel(ours.decode(s1, za[1]), ours.decode(s2, za[1])) > 1e-3


def test_normalisation_flags(ours, ckpt, reference_vae):
    frames, lat = video_chunks(11, 1)[0], latent_chunks(12, 1)[0]
    sym = build_vae({"name": "wan", "dim": DIM, "normalize_on_encode": True, "denormalize_on_decode": False},
                    path=str(ckpt))
    raw = ours.encode(ours.new_state(), frames)
    norm = sym.encode(sym.new_state(), frames)
    mean, std = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)
    torch.testing.assert_close(norm, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    reference_vae.first_decode = True  # no un-normalisation = the reference with scale [0, 1]
    with torch.no_grad():
        expected = reference_vae.stream_decode(lat.transpose(1, 2), [torch.zeros(16), torch.ones(16)])
    assert rel(sym.decode(sym.new_state(), lat), expected.clamp(-1, 1).transpose(1, 2)) <= TOL


def test_bad_input_is_a_clear_error(ours):
    s = ours.new_state()
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        ours.encode(s, torch.zeros(1, 3, 4, H, W))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(s, torch.zeros(3, 5, H, W))
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.encode(s, torch.zeros(1, 3, 5, H + 4, W))
    ours.encode(s, torch.zeros(1, 3, 5, H, W))
    with pytest.raises(ValueError, match="multiple of 4 frames, got 3"):
        ours.encode(s, torch.zeros(1, 3, 3, H, W))
    with pytest.raises(ValueError, match="differs from this stream"):
        ours.encode(s, torch.zeros(1, 3, 4, H + 8, W))
    with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
        ours.decode(ours.new_state(), torch.zeros(1, 2, 8, H // 8, W // 8))
    with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
        ours.decode(ours.new_state(), torch.zeros(2, 16, H // 8, W // 8))


def test_strict_loading_names_file_and_keys(tmp_path, reference_vae):
    sd = dict(reference_vae.state_dict())
    sd.pop("decoder.head.2.bias")
    sd["encoder.extra"] = torch.zeros(1)
    sd["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        build_vae({"name": "wan", "dim": DIM}, wan_folder=str(tmp_path))
    msg = str(err.value)
    assert str(path) in msg and "decoder.head.2.bias (3,)" in msg and "encoder.extra" in msg
    assert "conv2.weight: file (16, 16, 3, 1, 1), expected (16, 16, 1, 1, 1)" in msg
    with pytest.raises(FileNotFoundError):
        build_vae("wan", path=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="neither"):
        build_vae("wan", wan_folder=str(tmp_path / ".."))
    with pytest.raises(ValueError, match="needs vae.path"):
        build_vae("wan")
    with pytest.raises(ValueError, match=r"unknown vae 'nope'; valid: \['taehv', 'wan'\]"):
        build_vae({"name": "nope"})
    with pytest.raises(ValueError, match="unknown Wan VAE options"):
        build_vae("wan", dummy=True, dim=DIM, colour="red")
    assert {"wan", "taehv"} <= set(registered_vaes())


def test_loads_on_meta_then_assigns_in_target_dtype(ckpt):
    vae = build_vae("wan", path=str(ckpt), dim=DIM, dtype=torch.bfloat16)
    assert not vae.weights_are_dummy
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in vae.parameters())
    sd = read_state_dict(ckpt)
    torch.testing.assert_close(vae.decoder.head[2].weight.float(), sd["decoder.head.2.weight"].bfloat16().float())
    z = vae.encode(vae.new_state(), video_chunks(13, 1)[0])
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()


def test_diffusers_folder_loads_through_converter(tmp_path, reference_vae, caplog):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(14)
    dvae = AutoencoderKLWan(base_dim=DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():
        for p in dvae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    dvae.save_pretrained(tmp_path / "vae")
    # the converter maps every diffusers key onto the official names
    names = set(diffusers_to_wan(dvae.state_dict()))
    assert names == set(reference_vae.state_dict())
    ours = build_vae("wan", path=str(tmp_path))  # a pipeline root holding vae/ (dim read from config.json)
    assert ours.encoder.conv1.weight.shape[0] == DIM
    frames = video_chunks(15, 3)
    video = torch.cat([frames[0], *frames[1:]], 2)
    with torch.no_grad():
        mu = dvae.encode(video).latent_dist.mean.transpose(1, 2)
    s = ours.new_state()
    got = torch.cat([ours.encode(s, f) for f in frames], 1)
    assert rel(got, mu) <= TOL
    z = torch.cat(latent_chunks(16, 3), 1)
    mean, std = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)
    with torch.no_grad():
        expected = dvae.decode((z * std + mean).transpose(1, 2)).sample.clamp(-1, 1).transpose(1, 2)
    s = ours.new_state()
    got = torch.cat([ours.decode(s, z[:, :2]), ours.decode(s, z[:, 2:3]), ours.decode(s, z[:, 3:])], 1)
    assert got.shape == expected.shape == (1, 13, 3, H, W)
    assert rel(got, expected) <= TOL
    # the file's architecture wins over a config's (dummy-weight) width, and the log says so
    with caplog.at_level(logging.INFO, logger="sdv2_lab.vae.wan_vae"):
        wide = build_vae("wan", path=str(tmp_path / "vae"), dim=32)
    assert wide.encoder.conv1.weight.shape[0] == DIM
    assert f"vae.dim=32, but {tmp_path / 'vae'}" in caplog.text and f"dim={DIM}: built as the file says" in caplog.text


def test_dummy_vae_is_flagged_and_finite():
    vae = build_vae({"name": "wan", "dim": DIM}, dummy=True)
    assert vae.weights_are_dummy
    z = vae.encode(vae.new_state(), torch.zeros(1, 3, 5, H, W))
    x = vae.decode(vae.new_state(), z)
    assert torch.isfinite(x).all() and x.shape == (1, 5, 3, H, W) and x.std() > 0


def test_cuda_graph_on_cpu_logs_and_runs_eager(ckpt, ours, caplog):
    with caplog.at_level(logging.INFO):
        vae = build_vae("wan", path=str(ckpt), dim=DIM, accelerate="cuda_graph")
    assert "needs a CUDA device" in caplog.text
    f = video_chunks(17, 1)[0]
    torch.testing.assert_close(vae.encode(vae.new_state(), f), ours.encode(ours.new_state(), f))
    with pytest.raises(ValueError, match="unknown accelerate mode"):
        build_vae("wan", path=str(ckpt), dim=DIM, accelerate="warp")


def test_compiled_steps_run_and_equal_eager(ckpt, ours):
    """The steady-state steps trace through torch.compile (backend 'eager': dynamo only, fast on CPU)."""
    from sdv2_lab.vae.accel import accelerate_vae
    torch._dynamo.reset()
    vae = accelerate_vae(build_vae("wan", path=str(ckpt), dim=DIM), "compile", backend="eager")
    frames, lat = video_chunks(18, 3), latent_chunks(19, 3)
    sa, sb = vae.new_state(), ours.new_state()
    for f in frames:
        assert rel(vae.encode(sa, f), ours.encode(sb, f)) <= 1e-6
    sa, sb = vae.new_state(), ours.new_state()
    for z in lat:
        assert rel(vae.decode(sa, z), ours.decode(sb, z)) <= 1e-6
    for step in vae._steps.values():
        assert step.fallback_reason is None and step.accelerated_calls == 3
