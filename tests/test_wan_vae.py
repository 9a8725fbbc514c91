"""The streaming Wan VAE against the reference ``WanVAE_`` (same random weights), and its loading rules.

Parity: 12 consecutive chunks (5 frames, then 4-frame chunks) through stream_encode, and 12 latent chunks
(2 latents, then 1) through stream_decode: relative L2 error <= 1e-4 in fp32, every chunk.
"""
import pytest
import torch

from sdv2_lab.vae import build_vae
from sdv2_lab.vae.base import materialize, read_state_dict
from sdv2_lab.vae.wan import LATENT_MEAN, LATENT_STD, WanVAE

DIM, H, W = 16, 32, 48
CHUNKS = 12


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
def ours(reference_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(reference_vae.state_dict(), path)
    return build_vae({"name": "wan", "dim": DIM}, wan_folder=str(path.parent), dtype=torch.float32)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_state_dict_names_and_shapes_equal_reference(reference_vae):
    ours = WanVAE(dim=DIM)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in reference_vae.state_dict().items()}
    assert a == b


def test_streaming_encode_equals_reference(reference_vae, ours):
    torch.manual_seed(1)
    video = torch.randn(1, 3, 1 + 4 * CHUNKS, H, W).clamp(-1, 1)
    reference_vae.first_encode = True
    state = ours.new_state()
    with torch.no_grad():
        for c in range(CHUNKS):
            frames = video[:, :, :5] if c == 0 else video[:, :, 1 + 4 * c:5 + 4 * c]
            expected = reference_vae.stream_encode(frames, None).transpose(1, 2)  # [B, F, 16, h, w]
            got = ours.encode(state, frames)
            assert got.shape == expected.shape == (1, 2 if c == 0 else 1, 16, H // 8, W // 8)
            assert rel(got, expected) <= 1e-4, (c, rel(got, expected))


def test_streaming_decode_equals_reference(reference_vae, ours):
    torch.manual_seed(2)
    z = torch.randn(1, CHUNKS + 1, 16, H // 8, W // 8)
    mean, std = torch.tensor(LATENT_MEAN), torch.tensor(LATENT_STD)
    reference_vae.first_decode = True
    state = ours.new_state()
    with torch.no_grad():
        for c in range(CHUNKS):
            lat = z[:, :2] if c == 0 else z[:, c + 1:c + 2]
            expected = reference_vae.stream_decode(lat.transpose(1, 2), [mean, 1.0 / std]).clamp(-1, 1).transpose(1, 2)
            got = ours.decode(state, lat)
            assert got.shape == expected.shape == (1, 5 if c == 0 else 4, 3, H, W)
            assert rel(got, expected) <= 1e-4, (c, rel(got, expected))


def test_streams_are_independent(ours):
    torch.manual_seed(3)
    a, b = torch.randn(2, 1, 3, 13, H, W).clamp(-1, 1)
    with torch.no_grad():
        alone = []
        s = ours.new_state()
        alone = [ours.encode(s, a[:, :, :5]), ours.encode(s, a[:, :, 5:9]), ours.encode(s, a[:, :, 9:13])]
        sa, sb = ours.new_state(), ours.new_state()
        mixed = []
        for sl in (slice(0, 5), slice(5, 9), slice(9, 13)):
            mixed.append(ours.encode(sa, a[:, :, sl]))
            ours.encode(sb, b[:, :, sl])
    for x, y in zip(alone, mixed):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_normalisation_flags(reference_vae, ours):
    torch.manual_seed(4)
    frames = torch.randn(1, 3, 5, H, W).clamp(-1, 1)
    sym = build_vae({"name": "wan", "dim": DIM, "normalize_on_encode": True}, wan_folder=None, dummy=True)
    sym.load_state_dict(ours.state_dict())
    with torch.no_grad():
        raw = ours.encode(ours.new_state(), frames)
        norm = sym.encode(sym.new_state(), frames)
    mean, std = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)
    torch.testing.assert_close(norm, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_bad_frame_counts_are_errors(ours):
    s = ours.new_state()
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        ours.encode(s, torch.zeros(1, 3, 4, H, W))
    ours.encode(s, torch.zeros(1, 3, 5, H, W))
    with pytest.raises(ValueError, match="multiple of 4 frames, got 3"):
        ours.encode(s, torch.zeros(1, 3, 3, H, W))


def test_strict_loading_names_file_and_keys(tmp_path, reference_vae):
    sd = dict(reference_vae.state_dict())
    sd.pop("decoder.head.2.bias")
    sd["encoder.extra"] = torch.zeros(1)
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        build_vae({"name": "wan", "dim": DIM}, wan_folder=str(tmp_path))
    assert str(path) in str(err.value) and "decoder.head.2.bias" in str(err.value) and "encoder.extra" in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown vae 'nope'"):
        build_vae({"name": "nope"})


def test_dummy_vae_is_flagged_and_finite():
    vae = build_vae({"name": "wan", "dim": DIM}, dummy=True)
    assert vae.weights_are_dummy
    with torch.no_grad():
        z = vae.encode(vae.new_state(), torch.zeros(1, 3, 5, H, W))
        x = vae.decode(vae.new_state(), z)
    assert torch.isfinite(x).all() and x.shape == (1, 5, 3, H, W)
    assert materialize is not None
