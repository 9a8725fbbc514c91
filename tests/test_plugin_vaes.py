"""The LightX2V plugin VAEs from files of their published layout: ``lightvaew2_1`` (the Wan VAE at base width 24)
and ``lighttaew2_1`` (TAEHV trained on raw Wan latents), each as ``.pth`` and ``.safetensors``, loaded strictly
through their configs (``conf/vae/lightvae*.yaml``, ``lighttae*.yaml``); a missing or mis-shaped key names the
file and the key; encode -> decode of each against a float64 run of the same module.

Tolerances: float32 against float64 of the same weights, relative L2 <= 1e-5 per chunk (observed ~1e-7);
latent-space arithmetic exact up to float32 rounding (1e-6).
"""
import pytest
import torch

from sdv2_lab.build import build_vae, compose_config
from sdv2_lab.tiny_checkpoint import _randomise, _save
from sdv2_lab.vae import LATENT_MEAN, LATENT_STD
from sdv2_lab.vae.taehv import TAEHV
from sdv2_lab.vae.wan_vae import WanVAE

H, W = 16, 32
MEAN, STD = torch.tensor(LATENT_MEAN).view(1, 1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 1, 16, 1, 1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """lightvaew2_1 and lighttaew2_1 in both published containers (random weights, the official names and shapes)."""
    d = tmp_path_factory.mktemp("plugins")
    gen = torch.Generator().manual_seed(0)
    light, tae = _randomise(WanVAE(dim=24), gen), _randomise(TAEHV(), gen)
    for name, sd in (("lightvaew2_1", light), ("lighttaew2_1", tae)):
        for suffix in (".pth", ".safetensors"):
            (d / suffix[1:]).mkdir(exist_ok=True)
            _save(sd, d / suffix[1:] / f"{name}{suffix}")
    return d


def cfg(vae, files, suffix, **extra):
    """The config a user gets: vae=<name>, real weights, the plugin file named by weights.lightvae/lighttae."""
    folder = files / suffix
    ov = ["device=cpu", "weights=real", f"vae={vae}", f"weights.lightvae={folder / ('lightvaew2_1.' + suffix)}",
          f"weights.lighttae={folder / ('lighttaew2_1.' + suffix)}", "weights.wan_folder=null"]
    return compose_config("config", ov + [f"{k}={v}" for k, v in extra.items()])


def clip(seed, chunks=3):
    return torch.rand(1, 3, 1 + 4 * chunks, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def round_trip(vae, video):
    """Encode a clip chunk by chunk (5 frames, then 4) and decode the latents chunk by chunk (2, then 1)."""
    s = vae.new_state()
    p = next(vae.parameters())
    chunks = [video[:, :, :5]] + [video[:, :, 1 + 4 * c:5 + 4 * c] for c in range(1, (video.shape[2] - 1) // 4)]
    zs = [vae.encode(s, c.to(p.dtype)) for c in chunks]
    return zs, [vae.decode(s, z) for z in zs]


def test_published_widths_and_sizes(files):
    """plugins.md: LightVAE is the Wan VAE with every width x 0.25 (24, 24, 48, 96, 96); LightTAE has TAEHV's
    shapes: 11.3 M parameters, the 45.3 MB float32 safetensors."""
    sd = WanVAE(dim=24).state_dict()
    widths = [sd[k].shape[0] for k in ("encoder.conv1.weight", "encoder.downsamples.0.residual.2.weight",
                                       "encoder.downsamples.3.residual.2.weight", "encoder.downsamples.6.residual.2.weight",
                                       "encoder.downsamples.9.residual.2.weight")]
    assert widths == [24, 24, 48, 96, 96]
    assert set(sd) == set(WanVAE(dim=96).state_dict())        # the same key names as Wan2.1_VAE.pth
    size = (files / "safetensors" / "lighttaew2_1.safetensors").stat().st_size
    assert abs(size - 45.3e6) < 0.1e6


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_lightvae_loads_strictly_with_its_width_from_the_file(files, suffix):
    vae = build_vae(cfg("lightvae", files, suffix), "cpu", torch.float32)
    assert not vae.weights_are_dummy and vae.encoder.conv1.weight.shape[0] == 24
    tiny = build_vae(cfg("lightvae_tiny", files, suffix), "cpu", torch.float32)   # dim 8 in the config: the file wins
    assert tiny.encoder.conv1.weight.shape[0] == 24
    from sdv2_lab.vae.checkpoints import read_state_dict
    sd = read_state_dict(files / suffix / f"lightvaew2_1.{suffix}")
    torch.testing.assert_close(vae.decoder.head[2].weight, sd["decoder.head.2.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_damaged_plugin_file_names_the_file_and_the_key(files, tmp_path, suffix):
    from sdv2_lab.vae.checkpoints import read_state_dict
    sd = read_state_dict(files / suffix / f"lightvaew2_1.{suffix}")
    sd.pop("decoder.upsamples.0.residual.2.bias")
    sd["encoder.middle.0.residual.2.weight"] = torch.zeros(96, 96, 1, 3, 3)
    bad = tmp_path / f"lightvaew2_1.{suffix}"
    _save(sd, bad)
    with pytest.raises(ValueError) as err:
        build_vae(compose_config("config", ["weights=real", "vae=lightvae", f"weights.lightvae={bad}"]), "cpu",
                  torch.float32)
    msg = str(err.value)
    assert str(bad) in msg and "missing: decoder.upsamples.0.residual.2.bias (96,)" in msg
    assert "encoder.middle.0.residual.2.weight: file (96, 96, 1, 3, 3), expected (96, 96, 3, 3, 3)" in msg
    tae = read_state_dict(files / suffix / f"lighttaew2_1.{suffix}")
    tae["decoder.1.weight"] = tae["decoder.1.weight"][:8]
    bad = tmp_path / f"lighttaew2_1.{suffix}"
    _save(tae, bad)
    with pytest.raises(ValueError, match=rf"{bad.name}(.|\n)*decoder\.1\.weight: file \(8, 16, 3, 3\)"):
        build_vae(compose_config("config", ["weights=real", "vae=lighttae_full", f"weights.lighttae={bad}"]), "cpu",
                  torch.float32)
    with pytest.raises(FileNotFoundError, match=r"nothere\.pth.*weights\.lightvae"):
        build_vae(compose_config("config", ["weights=real", "vae=lightvae", f"weights.lightvae={tmp_path}/nothere.pth"]),
                  "cpu", torch.float32)


def test_a_pth_path_finds_the_safetensors_beside_it(files):
    vae = build_vae(compose_config("config", ["weights=real", "vae=lighttae_full",
                                              f"weights.lighttae={files / 'safetensors' / 'lighttaew2_1.pth'}"]),
                    "cpu", torch.float32)
    assert not vae.weights_are_dummy and vae.latent_space == "raw"


@pytest.mark.parametrize("vae_name", ["lightvae", "lighttae_full"])
def test_encode_decode_equals_a_float64_run_of_the_same_module(files, vae_name):
    vae = build_vae(cfg(vae_name, files, "safetensors"), "cpu", torch.float32)
    ref = build_vae(cfg(vae_name, files, "safetensors"), "cpu", torch.float64)
    video = clip(1)
    zs, xs = round_trip(vae, video)
    zr, xr = round_trip(ref, video.double())
    assert [z.shape[1] for z in zs] == [2, 1, 1] and [x.shape[1] for x in xs] == [5, 4, 4]
    for a, b in zip(zs + xs, zr + xr):
        assert rel(a, b) <= 1e-5


def test_lighttae_sees_raw_latents_and_hands_the_dit_raw_ones(files):
    """latent_space: raw. Decode: the DiT's output (normalised, as the Wan decoder reads it) is de-normalised
    before LightTAE decodes it. Encode (both ways): LightTAE's raw latents go to the DiT as they are, which is
    what the reference's DiT takes (the Wan encoder's raw mu). taew2_1's normalised space is the other case."""
    lt = build_vae(cfg("lighttae_full", files, "pth"), "cpu", torch.float32)
    taehv = lt.taehv
    z = torch.randn(1, 3, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    got = lt.decode(lt.new_state(), z)
    want = taehv.decode_video(z * STD + MEAN)[:, taehv.frames_to_trim:].mul(2).sub(1).clamp(-1, 1)
    assert rel(got, want) <= 1e-6
    video = clip(3, 1)
    x = (video * 0.5 + 0.5).transpose(1, 2)
    raw = taehv.encode_video(torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1))
    assert rel(lt.encode(lt.new_state(), video[:, :, :5]), raw) <= 1e-6   # no conversion on the way in
    # the same file read as normalised (taehv.yaml's space): the DiT's output goes in as is
    as_taew = build_vae(cfg("lighttae_full", files, "pth", **{"vae.latent_space": "normalized"}), "cpu", torch.float32)
    assert rel(as_taew.decode(as_taew.new_state(), z), taehv.decode_video(z)[:, 3:].mul(2).sub(1).clamp(-1, 1)) <= 1e-6
    # behind LightVAE's encoder (vae=lighttae vae.wan_path=${weights.lightvae})
    both = build_vae(cfg("lighttae", files, "pth", **{"vae.wan_path": "${weights.lightvae}"}), "cpu", torch.float32)
    assert both.wan.encoder.conv1.weight.shape[0] == 24 and both.latent_space == "raw" and both.dit_in == "raw"
    zs, xs = round_trip(both, clip(4, 2))
    assert [z.shape[1] for z in zs] == [2, 1] and [x.shape[1] for x in xs] == [5, 4]
