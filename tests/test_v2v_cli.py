"""The reference's run_v2v.sh interface maps onto Hydra overrides (flags and environment variables)."""
import subprocess

import pytest

from sdv2_lab.v2v import parse, to_overrides


def test_flags_and_env_become_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("STEP", "3")
    monkeypatch.setenv("OUTPUT_FOLDER", str(tmp_path / "o"))
    cfg = tmp_path / "wan_causal_dmd_v2v_fast.yaml"
    cfg.write_text("num_kv_cache: 5\nnum_sink_tokens: 2\nadapt_sink_threshold: -1\n"
                   "denoising_step_list: [700, 500, 400, 200, 0]\nlr: 0.1\n")
    ov = to_overrides(parse(["single-wo", "--height", "32", "--fps", "30", "--config_path", str(cfg),
                             "--prompt_file_path", "p.txt", "device=cpu"]))
    assert "parallel=single_wo" in ov and "steps=3" in ov and "height=32" in ov and "fps=30" in ov
    assert f"hydra.run.dir={tmp_path / 'o'}" in ov and "output.name=output_000.mp4" in ov
    assert "noise_scale=0.7" in ov  # the reference's single-wo default
    assert {"num_kv_cache=5", "sink_frames=2", "adapt_sink_threshold=-1",
            "denoising_step_list=[700,500,400,200]"} <= set(ov)
    assert ov[-1] == "device=cpu"


def test_checkpoint_selects_real_weights_and_model_size(tmp_path):
    ov = to_overrides(parse(["single", "--checkpoint_folder", "ck", "--model_type", "T2V-14B", "--gpu_id", "1"]))
    assert {"backbone=wan_14b", "weights=real", "weights.checkpoint=ck", "device=cuda:1",
            "weights.wan_folder=wan_models/Wan2.1-T2V-14B"} <= set(ov)


def test_pipe_and_bad_flags_are_refused():
    with pytest.raises(SystemExit, match="pipe mode"):
        to_overrides(parse(["pipe"]))
    with pytest.raises(SystemExit):
        parse(["single", "--no_such_flag"])


def test_shell_wrapper_runs(tmp_path):
    res = subprocess.run(["bash", "run_v2v.sh", "single", "--height", "32", "--width", "48", "--step", "1",
                          "--output_folder", str(tmp_path), "device=cpu", "vae=wan_tiny", "input.frames=13"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    assert (tmp_path / "output_000.mp4").exists()
