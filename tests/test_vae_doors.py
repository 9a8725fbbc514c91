"""Every VAE choice through every door: {wan, taehv, taehv_full, lightvae, lighttae, lighttae_full} x {``sdv2 run``,
``run_v2v.sh``, the Python API, ``sdv2 serve`` (the engine build)} x {dummy weights, a tiny checkpoint folder in the
official layout (``sdv2_lab.tiny_checkpoint``: Wan2.1_VAE.pth, taew2_1.pth, lightvaew2_1.pth,
lighttaew2_1.safetensors)}, in process; and the two failures the issue names, as subprocesses.

What is checked per case: the VAE built is the one named (its kind, encoder, latent space and width, read from the
files with a checkpoint folder), real or dummy as the weights are, and the door runs a short clip (the serve door
builds the engine only). With a checkpoint folder the text encoder is the hashed stand-in (``text_encoder=hashed``):
the UMT5 path is test_user_checkpoint.py's; here the VAE is under test.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdv2_lab.build as build
from sdv2_lab.build import compose_config
from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.seed_config import VAES, seed_overrides
from sdv2_lab.vae.taehv import TAEHVVAE
from test_user_checkpoint import CKPT, tiny_root  # noqa: F401  (the session fixture)

H, W = 16, 32
ROOT = Path(__file__).resolve().parents[1]
FAST = ["text_encoder=hashed"]
# name -> (Wan part: "wan" decoder+encoder | "enc" encoder only | None, latent space of the TAE, width dummy / file)
EXPECT = {"wan": ("wan", None, 16, 16), "lightvae": ("wan", None, 8, 24), "taehv": ("enc", "normalized", 16, 16),
          "taehv_full": (None, "normalized", None, None), "lighttae": ("enc", "raw", 16, 16),
          "lighttae_full": (None, "raw", None, None)}


def check(vae, name, folder):
    """The VAE built is ``name``'s: kind, encoder, latent space, width (the file's with a folder), weights."""
    wan_part, space, dummy_width, file_width = EXPECT[name]
    width = file_width if folder else dummy_width
    if wan_part == "wan":
        assert not isinstance(vae, TAEHVVAE) and vae.encoder.conv1.weight.shape[0] == width
    else:
        assert isinstance(vae, TAEHVVAE) and vae.latent_space == space
        assert (vae.wan is None) == (wan_part is None)
        if vae.wan is not None:
            assert vae.wan.encoder.conv1.weight.shape[0] == width
    assert vae.weights_are_dummy == (not folder)


@pytest.fixture
def built(monkeypatch):
    """The VAEs the door builds (``build.build_vae`` recorded)."""
    seen = []
    real = build.build_vae
    monkeypatch.setattr(build, "build_vae", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("doors")
    write_synthetic_clip(d / "clip.mp4", frames=9, height=H, width=W)
    (d / "p.txt").write_text("a watercolor painting\n")
    return d


def folder_overrides(root, name):
    """What a user of sdv2 run / sdv2 serve types for a checkpoint folder (what seed_config makes of it), then
    the VAE choice as their own override, last."""
    return seed_overrides(checkpoint_folder=root / CKPT, device="cpu", height=H, width=W, step=1) + FAST + \
        [f"vae={name}"]


NAMES = sorted(VAES)
MODES = ["dummy", "folder"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_sdv2_run(name, mode, tiny_root, tmp_path, built):
    from sdv2_lab.cli import run
    ov = folder_overrides(tiny_root, name) if mode == "folder" else \
        ["device=cpu", f"height={H}", f"width={W}", "steps=1", f"vae={VAES[name][1]}"]
    stats = run(compose_config("config", ov + ["input.frames=9", f"output.dir={tmp_path}", "output.timings=null"]))
    check(built[-1], name, mode == "folder")
    assert stats["output_frames"] == 9 and (tmp_path / "output.mp4").is_file()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_run_v2v(name, mode, tiny_root, workdir, tmp_path, built):
    from sdv2_lab.v2v import main
    args = ["single", "--device", "cpu", "--height", str(H), "--width", str(W), "--step", "1", "--video_path",
            str(workdir / "clip.mp4"), "--prompt_file_path", str(workdir / "p.txt"), "--output_folder",
            str(tmp_path), "--vae", name]
    main(args + (["--checkpoint_folder", str(tiny_root / CKPT)] + FAST if mode == "folder" else []))
    check(built[-1], name, mode == "folder")
    assert (tmp_path / "output_000.mp4").is_file()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_api(name, mode, tiny_root):
    from sdv2_lab import StreamDiffusionV2Pipeline
    from sdv2_lab.io.synthetic import synthetic_clip
    pipe = StreamDiffusionV2Pipeline(tiny_root / CKPT if mode == "folder" else None, vae=name, device="cpu",
                                     height=H, width=W, step=1, overrides=FAST if mode == "folder" else None)
    check(pipe.pipeline.vae, name, mode == "folder")
    pipe.prepare("a red square")
    assert pipe(synthetic_clip(9, H, W)[0]).shape == (9, H, W, 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_serve_engine(name, mode, tiny_root):
    from sdv2_lab.serve.engine import Engine
    from sdv2_lab.serve.settings import ServeSettings
    ov = folder_overrides(tiny_root, name) if mode == "folder" else \
        [f"height={H}", f"width={W}", f"vae={VAES[name][1]}"]
    cfg = compose_config("serve", ov + ["serve.max_streams=2", "serve.warmup=false"])
    engine = Engine(cfg, ServeSettings.from_config(cfg.serve))
    check(engine.driver.vae, name, mode == "folder")
    assert engine.describe()["vae"] == cfg.vae.name
    taehv_switch = engine.vae_for(True)     # a client's "taehv" switch: the config's TAE, or serve.taehv_vae's
    assert isinstance(taehv_switch, TAEHVVAE)
    engine.shutdown()


# ---------------------------------------------------------------------------------------------- the issue's cases
def test_taehv_both_ways_as_taehv_yaml_documents_it(tiny_root, built):
    """`vae=taehv vae.encoder=taehv` (dummy and with a checkpoint folder) is TAEHV both ways: the Wan encoder's
    options in taehv.yaml are unused, not an error."""
    from sdv2_lab.build import build_pipeline
    for ov in ([f"height={H}", f"width={W}", "device=cpu"], folder_overrides(tiny_root, "taehv")):
        pipe = build_pipeline(compose_config("config", ov + ["vae=taehv", "vae.encoder=taehv"]))
        assert isinstance(pipe.vae, TAEHVVAE) and pipe.vae.wan is None


@pytest.mark.parametrize("choice", ["vae=taehv_full", "vae=lightvae", "vae=lighttae_full", "vae=wan_tiny"])
def test_a_vae_override_after_a_checkpoint_folder(choice, tiny_root, built):
    """The API's overrides=[...] after a checkpoint folder: no internal key of the seed's VAE leaks into the
    user's choice (it used to fail with "Could not override 'vae.dim'")."""
    from sdv2_lab import StreamDiffusionV2Pipeline
    pipe = StreamDiffusionV2Pipeline(tiny_root / CKPT, device="cpu", height=H, width=W, step=1,
                                     overrides=FAST + [choice])
    assert pipe.cfg.vae.name == ("wan" if choice in ("vae=lightvae", "vae=wan_tiny") else "taehv")
    assert not pipe.pipeline.vae.weights_are_dummy


def test_a_missing_plugin_file_says_where_it_was_looked_for(tiny_root, tmp_path, monkeypatch):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("complete", "lightvaew2_1.*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMDIFFUSIONV2_ROOT", raising=False)
    monkeypatch.delenv("SDV2_LIGHTVAE", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        seed_overrides(checkpoint_folder=root / CKPT, device="cpu", vae="lightvae")
    msg = str(err.value)
    assert "lightvaew2_1.pth or lightvaew2_1.safetensors" in msg and str(root / "ckpts") in msg
    assert "lightx2v/Autoencoders" in msg and "$SDV2_LIGHTVAE" in msg
    ov = seed_overrides(checkpoint_folder=root / CKPT, device="cpu")   # not asked for: where it is expected
    assert f"weights.lightvae='{root / 'ckpts' / 'lightvaew2_1.pth'}'" in ov
    monkeypatch.setenv("SDV2_LIGHTVAE", str(tiny_root / "ckpts" / "lightvaew2_1.pth"))
    assert f"weights.lightvae='{tiny_root / 'ckpts' / 'lightvaew2_1.pth'}'" in \
        seed_overrides(checkpoint_folder=root / CKPT, device="cpu", vae="lightvae")


def test_seed_vae_argument_rules():
    assert "vae=lightvae_tiny" in seed_overrides(device="cpu", vae="lightvae")     # no folder: the tiny variant
    assert not [o for o in seed_overrides(device="cpu") if o.startswith("vae=")]   # the config's default
    assert "vae=taehv_tiny" in seed_overrides(device="cpu", use_taehv=True)
    assert "vae=lighttae_tiny" in seed_overrides(device="cpu", use_taehv=True, vae="lighttae")
    with pytest.raises(ValueError, match="vae must be one of"):
        seed_overrides(device="cpu", vae="vqgan")
    with pytest.raises(ValueError, match="use_taehv"):
        seed_overrides(device="cpu", vae="lightvae", fast=True)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHON": sys.executable}


def test_the_issue_commands_as_a_user_types_them(tiny_root, workdir, tmp_path):
    """`./run_v2v.sh single --checkpoint_folder ... vae=taehv_full` and `sdv2 run vae=taehv vae.encoder=taehv`."""
    res = subprocess.run(["bash", str(ROOT / "run_v2v.sh"), "single", "--checkpoint_folder", str(tiny_root / CKPT),
                          "--video_path", "clip.mp4", "--prompt_file_path", "p.txt", "--output_folder",
                          str(tmp_path / "a"), "--height", str(H), "--width", str(W), "--device", "cpu",
                          "vae=taehv_full"], capture_output=True, text=True, timeout=300, cwd=workdir, env=ENV)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert "VAE taehv" in res.stdout and "weights: real" in res.stdout   # the start-up line: what runs
    res = subprocess.run([sys.executable, "-m", "sdv2_lab.cli", "run", "vae=taehv", "vae.encoder=taehv",
                          f"height={H}", f"width={W}", "input.frames=9", f"output.dir={tmp_path / 'b'}"],
                         capture_output=True, text=True, timeout=300, cwd=workdir, env=ENV)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert (tmp_path / "b" / "output.mp4").is_file()
