"""The command lines as a user meets them (subprocesses in a temporary working directory): help, run_v2v.sh on
a CPU with a checkpoint folder, the caller's paths, and failures that say what to do and leave nothing behind."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.io.video import probe_video
from test_user_checkpoint import CKPT, copy_layout, tiny_root  # noqa: F401  (the session fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHON": sys.executable}
SMALL = ["--height", "32", "--width", "48"]


def sdv2(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sdv2_lab.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=ENV)


def run_v2v(*args, cwd, env=None):
    return subprocess.run(["bash", str(ROOT / "run_v2v.sh"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**ENV, **(env or {})})


@pytest.fixture
def workdir(tmp_path):
    """The caller's directory: a clip and a prompt file, addressed by relative paths."""
    write_synthetic_clip(tmp_path / "clip.mp4", frames=13, height=32, width=48)
    (tmp_path / "p.txt").write_text("a watercolor painting\n")
    return tmp_path


@pytest.mark.parametrize("how", [["help"], ["--help"], ["-h"]])
def test_help_lists_the_commands_and_main_options(tmp_path, how):
    res = sdv2(*how, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for text in ("run ", "eval ", "help ", "device=", "steps=1..4", "vae=", "taehv_tiny", "input.video=", "-m "):
        assert text in res.stdout, text


def test_run_v2v_with_a_checkpoint_folder_on_a_cpu(tiny_root, workdir):
    """No --device: a CPU machine runs on the CPU (it used to force device=cuda); the caller's relative paths."""
    ckpt = os.path.relpath(tiny_root / CKPT, workdir)
    res = run_v2v("single", "--checkpoint_folder", ckpt, "--video_path", "clip.mp4", "--prompt_file_path", "p.txt",
                  "--output_folder", "out", *SMALL, "--use_taehv", cwd=workdir)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "single on cpu" in res.stdout and "weights: real" in res.stdout
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["output_000.mp4"]   # no .hydra, cli.log
    assert probe_video(workdir / "out" / "output_000.mp4").frames == 13
    assert "13/13" in res.stderr                                                       # progress with a total
    assert "DUMMY" not in res.stdout + res.stderr


def test_run_v2v_on_a_cpu_says_which_size_it_chose(workdir):
    write_synthetic_clip(workdir / "short.mp4", frames=3, height=32, width=48)  # fails before building: fast
    res = run_v2v("single", "--video_path", "short.mp4", "--prompt_file_path", "p.txt", cwd=workdir,
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert "running at 240x416" in res.stdout and "--height 480 --width 832" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--step", "7"], "--step 7: expected an integer from 1 to 4"),
    (["--step", "two"], "argument --step: invalid int value: 'two'"),
    (["--height", "0"], "--height and --width must be positive multiples of 16"),
    (["--prompt_file_path", "nope.txt"], "--prompt_file_path"),
])
def test_run_v2v_errors_name_the_flag_typed(workdir, args, message):
    base = {"--prompt_file_path": "p.txt", "--video_path": "clip.mp4", "--device": "cpu", "--height": "32",
            "--width": "48"}
    base.update(dict(zip(args[::2], args[1::2])))
    start = time.perf_counter()
    res = run_v2v("single", *[x for kv in base.items() for x in kv], cwd=workdir)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-1500:]
    assert "Traceback" not in res.stderr and "steps=" not in res.stderr and "input.prompt" not in res.stderr
    assert "sdv2 run:" not in res.stdout            # failed before any model was built
    assert time.perf_counter() - start < 60


def test_an_output_path_that_is_a_folder_fails_before_building_and_leaves_nothing(workdir):
    (workdir / "out" / "output_000.mp4").mkdir(parents=True)
    res = run_v2v("single", "--video_path", "clip.mp4", "--prompt_file_path", "p.txt", "--output_folder", "out",
                  "--device", "cpu", *SMALL, cwd=workdir)
    assert res.returncode != 0 and "is an existing folder" in res.stderr
    assert "sdv2 run:" not in res.stdout
    assert not [p for p in workdir.rglob("*") if ".tmp" in p.name]


def test_a_still_image_is_named_as_such(workdir):
    import cv2
    cv2.imwrite(str(workdir / "frame.png"), np.zeros((32, 48, 3), np.uint8))
    res = run_v2v("single", "--video_path", "frame.png", "--prompt_file_path", "p.txt", "--device", "cpu", *SMALL,
                  cwd=workdir)
    assert res.returncode != 0 and "is a single image (png), not a video" in res.stderr, res.stderr[-800:]


def test_a_clip_shorter_than_the_first_chunk_says_how_many_frames(workdir):
    write_synthetic_clip(workdir / "short.mp4", frames=3, height=32, width=48)
    res = sdv2("run", "input=file", "input.video=short.mp4", "input.prompt=p", "height=32", "width=48",
               cwd=workdir)
    assert res.returncode != 0 and "has 3 frame(s); the first chunk needs 5" in res.stderr + res.stdout


def test_a_truncated_model_pt_is_named_in_one_line(tiny_root, workdir):
    root = copy_layout(tiny_root, workdir / "root")
    model = root / CKPT / "model.pt"
    model.write_bytes(model.read_bytes()[:100_000])
    res = run_v2v("single", "--checkpoint_folder", str(root / CKPT), "--video_path", "clip.mp4",
                  "--prompt_file_path", "p.txt", "--device", "cpu", *SMALL, cwd=workdir)
    assert res.returncode != 0 and f"{model} looks truncated" in res.stderr and "Traceback" not in res.stderr


def test_sdv2_run_refuses_bad_sizes_before_building(workdir):
    start = time.perf_counter()
    res = sdv2("run", "height=0", cwd=workdir)
    assert res.returncode != 0 and "height and width must be positive multiples of 16" in res.stderr + res.stdout
    assert "sdv2 run:" not in res.stdout and time.perf_counter() - start < 60
