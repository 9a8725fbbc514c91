"""A checkpoint folder in the official layout is found and read as the reference finds it, by both front ends.

``tiny_root`` (imported by the other ``test_user_*`` files) writes ONE complete tiny checkpoint in the official
layout per test session: ``wan_models/Wan2.1-T2V-1.3B/`` (config.json, diffusion_pytorch_model.safetensors,
Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ SentencePiece tokenizer),
``ckpts/wan_causal_dmd_v2v/model.pt`` and ``ckpts/taew2_1.pth`` (``sdv2_lab.tiny_checkpoint``).
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdv2_lab.build import compose_config
from sdv2_lab.seed_config import resolve_checkpoint_folder, seed_overrides
from sdv2_lab.tiny_checkpoint import DIT, VAE_DIM, write_tiny_checkpoint

CKPT = "ckpts/wan_causal_dmd_v2v"
WAN = "wan_models/Wan2.1-T2V-1.3B"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """The root of a complete tiny checkpoint (written once per session, shared by every module that uses it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_checkpoint"
    if not (root / "complete").exists():
        write_tiny_checkpoint(root)
        (root / "complete").write_text("ok")
    return root


def copy_layout(tiny_root: Path, dest: Path, link: bool = False) -> Path:
    """A copy of the tiny root at ``dest``. ``link``: its files hard-linked to the originals (no 170 MB copy), for
    callers that only read them: a file written in place there would change every later test's checkpoint."""
    shutil.copytree(tiny_root, dest, ignore=shutil.ignore_patterns("complete", "examples", "outputs"),
                    copy_function=os.link if link else shutil.copy2)
    return dest


def test_the_fixture_writes_every_official_file(tiny_root):
    wan = tiny_root / WAN
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth",
                 "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model",
                 "google/umt5-xxl/tokenizer_config.json"):
        assert (wan / name).is_file(), name
    assert (tiny_root / CKPT / "model.pt").is_file() and (tiny_root / "ckpts/taew2_1.pth").is_file()
    assert (tiny_root / "ckpts/lightvaew2_1.pth").is_file() and (tiny_root / "ckpts/lighttaew2_1.safetensors").is_file()
    assert "generator" in torch.load(tiny_root / CKPT / "model.pt", weights_only=True)


def test_layout_is_found_from_the_checkpoint_folder_wherever_the_command_runs(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the root: found through the folder the checkpoint sits in
    monkeypatch.delenv("STREAMDIFFUSIONV2_ROOT", raising=False)
    monkeypatch.delenv("SDV2_WAN_ROOT", raising=False)
    layout = resolve_checkpoint_folder(tiny_root / CKPT, need_taehv=True)
    assert layout.checkpoint == tiny_root / CKPT / "model.pt"
    assert layout.wan_folder.resolve() == (tiny_root / WAN).resolve()
    assert layout.taehv.resolve() == (tiny_root / "ckpts/taew2_1.pth").resolve()
    # $STREAMDIFFUSIONV2_ROOT comes first, as in the reference
    other = copy_layout(tiny_root, tmp_path / "other_root")
    monkeypatch.setenv("STREAMDIFFUSIONV2_ROOT", str(other))
    assert resolve_checkpoint_folder(tiny_root / CKPT).wan_folder == other / WAN


def test_overrides_select_real_weights_umt5_and_sizes_from_the_files(tiny_root):
    """The issue: the API composed text_encoder=hashed and the tiny VAE, and said DUMMY. Now every part is real,
    and the sizes (DiT from config.json, T5 from its tensors) need no override; the VAE reads its width from the
    file it loads (no vae.* override, which would clash with another VAE's config)."""
    from sdv2_lab.build import build_vae
    ov = seed_overrides(checkpoint_folder=tiny_root / CKPT, device="cpu")
    assert not [o for o in ov if o.startswith(("vae.dim", "+vae", "++vae"))]
    cfg = compose_config("config", ov)
    assert cfg.weights.kind == "real" and cfg.backbone.name == "wan_1_3b"
    assert {k: cfg.backbone[k] for k in DIT} == DIT                       # from config.json
    assert cfg.vae.name == "wan" and build_vae(cfg, "cpu", torch.float32).encoder.conv1.weight.shape[0] == VAE_DIM
    assert cfg.text_encoder.name == "umt5" and cfg.text_encoder.dim == 4096 and cfg.text_encoder.layers == 2
    assert Path(cfg.text_encoder.tokenizer) == tiny_root / WAN / "google/umt5-xxl"
    fast = compose_config("config", seed_overrides(checkpoint_folder=tiny_root / CKPT, device="cpu", fast=True))
    assert fast.vae.name == "taehv" and Path(fast.weights.taehv).name == "taew2_1.pth"
    assert build_vae(fast, "cpu", torch.float32).wan.encoder.conv1.weight.shape[0] == VAE_DIM
    assert (fast.num_kv_cache, fast.sink_frames, fast.adapt_sink_threshold) == (5, 2, -1)


def test_paths_with_spaces_commas_and_quotes_survive(tiny_root, tmp_path):
    root = copy_layout(tiny_root, tmp_path / "my root, v2 (l'été)")
    cfg = compose_config("config", seed_overrides(checkpoint_folder=root / CKPT, device="cpu", use_taehv=True))
    assert Path(cfg.weights.checkpoint) == root / CKPT / "model.pt" and Path(cfg.weights.taehv).parent == root / "ckpts"


def test_a_bigger_config_json_is_taken_as_is(tiny_root, tmp_path):
    root = copy_layout(tiny_root, tmp_path / "root")
    config = json.loads((root / WAN / "config.json").read_text())
    config.update(dim=512, num_heads=4, num_layers=3)
    (root / WAN / "config.json").write_text(json.dumps(config))
    cfg = compose_config("config", seed_overrides(checkpoint_folder=root / CKPT, device="cpu"))
    assert (cfg.backbone.dim, cfg.backbone.num_heads, cfg.backbone.num_layers) == (512, 4, 3)


@pytest.mark.parametrize("missing, expected", [
    ("wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "the Wan VAE Wan2.1_VAE.pth"),
    ("wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.pth"),
    ("wan_models/Wan2.1-T2V-1.3B/google", "google/umt5-xxl"),
    ("wan_models/Wan2.1-T2V-1.3B/config.json", "config.json"),
    ("wan_models", "wan_models/Wan2.1-T2V-1.3B"),
    ("ckpts/wan_causal_dmd_v2v/model.pt", "model.pt"),
    ("ckpts/taew2_1.pth", "taew2_1.pth"),
])
def test_a_missing_piece_names_the_file_and_where_it_was_looked_for(tiny_root, tmp_path, monkeypatch, missing,
                                                                     expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMDIFFUSIONV2_ROOT", raising=False)
    root = copy_layout(tiny_root, tmp_path / "root")
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        seed_overrides(checkpoint_folder=root / CKPT, device="cpu", use_taehv=True)
    message = str(err.value)
    assert expected in message
    assert str(root) in message                                            # where it was looked for
    if missing == "wan_models":  # every candidate root, with why
        assert "the working directory" in message and "the root of the checkpoint folder" in message


def test_a_truncated_model_pt_is_named_before_anything_is_built(tiny_root, tmp_path):
    root = copy_layout(tiny_root, tmp_path / "root")
    model = root / CKPT / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.pt looks truncated"):
        seed_overrides(checkpoint_folder=root / CKPT, device="cpu")


def test_the_api_and_run_v2v_build_the_same_configuration(tiny_root):
    """One function (seed_overrides) for both front ends: the same arguments give the same pipeline config."""
    from sdv2_lab.v2v import parse, to_overrides
    args = dict(checkpoint_folder=str(tiny_root / CKPT), mode="single-wo", step=1, height=32, width=48,
                noise_scale=0.7, device="cpu", use_taehv=True)
    api = compose_config("config", seed_overrides(**args))
    cli = compose_config("config", to_overrides(parse([
        "single-wo", "--checkpoint_folder", args["checkpoint_folder"], "--step", "1", "--height", "32",
        "--width", "48", "--device", "cpu", "--use_taehv"])))
    for key in ("backbone", "vae", "text_encoder", "weights", "mode", "steps", "height", "width",
                "noise_scale", "num_kv_cache", "sink_frames", "device"):
        assert api[key] == cli[key], key
