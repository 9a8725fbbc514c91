"""The reference's run_v2v.sh interface maps onto our config (flags and environment variables). The shell
wrapper itself runs in test_user_cli.py (from another directory, on a checkpoint folder)."""
from pathlib import Path

import pytest

from sdv2_lab.v2v import name_flags, parse, to_overrides
from test_user_checkpoint import CKPT, tiny_root  # noqa: F401  (the session fixture)


def test_flags_and_env_become_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("STEP", "3")
    monkeypatch.setenv("OUTPUT_FOLDER", str(tmp_path / "o"))
    cfg = tmp_path / "wan_causal_dmd_v2v_fast.yaml"
    cfg.write_text("num_kv_cache: 5\nnum_sink_tokens: 2\nadapt_sink_threshold: -1\n"
                   "denoising_step_list: [700, 500, 400, 200, 0]\nlr: 0.1\n")
    ov = to_overrides(parse(["single-wo", "--height", "32", "--fps", "30", "--config_path", str(cfg),
                             "--prompt_file_path", "p.txt", "--device", "cpu", "seed=3"]))
    assert "mode=single_wo" in ov and "steps=3" in ov and "height=32" in ov and "fps=30" in ov
    assert f"output.dir='{tmp_path / 'o'}'" in ov and "output.name=output_000.mp4" in ov
    assert f"input.prompt_file='{Path.cwd() / 'p.txt'}'" in ov   # the caller's path, made absolute
    assert "noise_scale=0.7" in ov  # the reference's single-wo default
    assert {"num_kv_cache=5", "sink_frames=2", "adapt_sink_threshold=-1",
            "denoising_step_list=[700,500,400,200]"} <= set(ov)
    assert ov[-1] == "seed=3"


def test_checkpoint_selects_real_weights_umt5_and_device(tiny_root):
    ov = to_overrides(parse(["single", "--checkpoint_folder", str(tiny_root / CKPT), "--gpu_id", "1"]))
    assert {"backbone=wan_1_3b", "weights=real", "device=cuda:1", "text_encoder=umt5_xxl", "vae=wan"} <= set(ov)
    assert f"weights.wan_folder='{tiny_root / 'wan_models/Wan2.1-T2V-1.3B'}'" in ov


def test_pipe_maps_to_stages_and_bad_flags_are_refused():
    ov = to_overrides(parse(["pipe", "--num_gpus", "3", "--schedule_block", "--device", "cpu"]))
    assert {"mode=pipe", "num_gpus=3", "mode.schedule_block=true"} <= set(ov)
    assert "mode=single" not in ov
    assert "mode.gpu_ids=[2,3]" in to_overrides(parse(["pipe", "--gpu_ids", "2,3"]))
    with pytest.raises(SystemExit, match="--num_gpus 3 but --gpu_ids"):
        to_overrides(parse(["pipe", "--num_gpus", "3", "--gpu_ids", "0,1"]))
    with pytest.raises(SystemExit):
        parse(["single", "--no_such_flag"])


def test_messages_name_the_flags_typed():
    assert name_flags("steps='two': expected an integer from 1 to 4") == "--step 'two': expected an integer from 1 to 4"
    assert name_flags("input.prompt_file /x/p.txt not found") == "--prompt_file_path /x/p.txt not found"
    assert name_flags("height and width must be positive multiples of 16") == \
        "--height and --width must be positive multiples of 16"
    assert name_flags("1 to 4 denoising steps are supported") == "1 to 4 denoising steps are supported"
    assert name_flags("device=cuda was asked for") == "--device cuda was asked for"


def test_the_seeds_files_are_the_defaults_where_they_exist(tiny_root, tmp_path, monkeypatch):
    """In a folder laid out as the seed's, `./run_v2v.sh single` with no flags uses its checkpoint, example video,
    prompt and YAML (and says so), as the seed's own script does; elsewhere nothing is assumed."""
    import shutil
    import subprocess
    import sys

    from sdv2_lab.io.synthetic import write_synthetic_clip
    from sdv2_lab.io.video import probe_video
    from sdv2_lab.v2v import seed_defaults
    from test_user_checkpoint import copy_layout
    monkeypatch.chdir(tmp_path)
    assert seed_defaults(parse(["single"])) == []                       # an empty folder: nothing found
    root = copy_layout(tiny_root, tmp_path / "seed")
    write_synthetic_clip(root / "examples" / "original.mp4", frames=9, height=32, width=48)
    (root / "examples" / "prompt.txt").write_text("A dog walks on the grass, realistic\n")
    (root / "configs").mkdir()
    (root / "configs" / "wan_causal_dmd_v2v.yaml").write_text("num_kv_cache: 6\nnum_sink_tokens: 3\n")
    script = Path(__file__).resolve().parents[1] / "run_v2v.sh"
    env = {**__import__("os").environ, "OUTPUT_FOLDER": "outputs/run_single", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(script), "single", "--device", "cpu", "--height", "32", "--width", "48"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    found = next(ln for ln in res.stdout.splitlines() if "the seed's files found here" in ln)
    for flag in ("--checkpoint_folder ckpts/wan_causal_dmd_v2v", "--video_path examples/original.mp4",
                 "--prompt_file_path examples/prompt.txt", "--config_path configs/wan_causal_dmd_v2v.yaml"):
        assert flag in found
    assert "DUMMY" not in res.stdout + res.stderr                          # the checkpoint's weights
    assert probe_video(root / "outputs" / "run_single" / "output_000.mp4").frames == 9
    monkeypatch.chdir(root)
    assert len(seed_defaults(parse(["single"]))) == 4
    shutil.rmtree(root / "ckpts" / "wan_causal_dmd_v2v")                 # a flag given or a file missing: not used
    used = " ".join(seed_defaults(parse(["single", "--video_path", "other.mp4"])))
    assert "--checkpoint_folder" not in used and "--video_path" not in used and "--prompt_file_path" in used
