"""The VAE table's machinery: the ``vae_fidelity`` metric (each VAE's streamed round trip of the input against
the Wan VAE's, PSNR / SSIM) and ``sdv2 eval -m experiment=vae_quality_tiny``, the sweep over every VAE, on CPU.
Quality on real weights cannot be measured here (no files can be had); these tests check the numbers are the
ones the metric says, and that the sweep makes one row per VAE."""
import math
import os
import subprocess
import sys

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from sdv2_lab.build import compose_config
from sdv2_lab.eval.results import gather_results
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.metrics import build_metrics
from sdv2_lab.metrics.vae_fidelity import build_round_trip_vae

H, W = 16, 32


def frames(n=9):
    return synthetic_clip(n, H, W)[0].transpose(0, 1).add(1).div(2)   # [T, 3, H, W] in [0, 1]


def metric(vae, reference="wan_tiny", weights=None):
    cfg = {"enabled": ["vae_fidelity"], "device": "cpu",
           "vae_fidelity": {"vae": vae, "reference": reference, "weights": weights or {"kind": "dummy"}}}
    (m,), missing = build_metrics(cfg)
    assert not missing
    return m


def test_the_reference_against_itself_is_exact_and_a_plugin_is_measured():
    x = frames()
    same = metric("wan_tiny")(x)
    assert set(same) == {"vae_psnr_vs_wan", "vae_ssim_vs_wan", "vae_psnr_vs_input", "vae_ssim_vs_input"}
    assert math.isinf(same["vae_psnr_vs_wan"]) and same["vae_ssim_vs_wan"] == 1.0
    other = metric("taehv_full_tiny")(x)
    assert all(math.isfinite(v) for v in other.values()) and other["vae_ssim_vs_wan"] < 1


def test_the_numbers_are_the_streamed_round_trip_against_the_input(tiny_root):
    """With the tiny checkpoint's real files (LightVAE's lightvaew2_1.pth): vae_psnr_vs_input is PSNR of the VAE's
    chunked encode -> decode, taken in one latent space, against the input frames."""
    cfg = compose_config("eval", ["weights=real", f"weights.lightvae={tiny_root / 'ckpts/lightvaew2_1.pth'}",
                                  f"weights.wan_folder={tiny_root / 'wan_models/Wan2.1-T2V-1.3B'}", "vae=lightvae",
                                  "metrics=vae_quality"])
    from omegaconf import OmegaConf
    mcfg = OmegaConf.to_container(cfg.metrics, resolve=True)
    (m,), _ = build_metrics(mcfg)
    assert not m.dummy and m.vae.encoder.conv1.weight.shape[0] == 24 and m.reference.encoder.conv1.weight.shape[0] == 16
    x = frames()
    got = m(x)
    vae = build_round_trip_vae(mcfg["vae_fidelity"]["vae"], mcfg["vae_fidelity"]["weights"], "cpu")
    s = vae.new_state()
    video = (x * 2 - 1).transpose(0, 1)[None]
    rec = torch.cat([vae.decode(s, vae.encode(s, video[:, :, :5])), vae.decode(s, vae.encode(s, video[:, :, 5:9]))], 1)
    rec = rec[0].add(1).div(2).clamp(0, 1)
    want = peak_signal_noise_ratio(rec, x, data_range=1.0, dim=(1, 2, 3), reduction="none").mean()
    assert abs(got["vae_psnr_vs_input"] - float(want)) < 1e-4
    assert vae.normalize_on_encode and vae.denormalize_on_decode


def test_sdv2_eval_sweeps_every_vae(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "-m", "sdv2_lab.cli", "eval", "-m", "experiment=vae_quality_tiny",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    df = gather_results(sweep)
    assert sorted(df["vae_config"]) == sorted(["wan_tiny", "lightvae_tiny", "lighttae_tiny", "lighttae_full_tiny",
                                               "taehv_tiny", "taehv_full_tiny"])
    assert (df["status"] == "ok").all()
    for col in ("vae_psnr_vs_wan", "vae_ssim_vs_wan", "vae_psnr_vs_input", "e2e_fps"):
        assert col in df.columns, col
    assert df.set_index("vae_config").loc["wan_tiny", "vae_ssim_vs_wan"] == 1.0


from test_user_checkpoint import tiny_root  # noqa: E402,F401  (the session fixture)
