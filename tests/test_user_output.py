"""What a person reads and what is left on disk: file modes, temp files on failure, one line per conversion and
per warning, summaries of measures only, a compact results table, skipped videos with their reason, and an
evaluation run whose console says each thing once."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch

from sdv2_lab.eval.results import ResultsWriter, compact_table, gather_results, write_atomic
from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.io.video import VideoWriter, export_video, load_video

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def mode(path) -> int:
    return Path(path).stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_of_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    frames = torch.rand(5, 32, 48, 3)
    export_video(frames, tmp_path / "v.mp4")
    write_atomic(tmp_path / "s.json", lambda f: f.write("{}"))
    writer = ResultsWriter(tmp_path / "run")
    writer.write({"video": "a", "e2e_fps": 1.0})
    for path in (tmp_path / "v.mp4", tmp_path / "s.json", writer.csv_path, writer.jsonl_path):
        assert mode(path) == expected, path


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import sdv2_lab.io.files
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "a.mp4") as w:
            w.write(torch.rand(2, 32, 48, 3))
            raise RuntimeError("the run failed half-way")
    monkeypatch.setattr(sdv2_lab.io.files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_video(torch.rand(2, 32, 48, 3), tmp_path / "b.mp4")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "c.csv", lambda f: f.write("x"))
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_is_a_folder_is_refused_before_writing(tmp_path):
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="out.mp4 is an existing folder"):
        VideoWriter(tmp_path / "out.mp4")
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


# ---------------------------------------------------------------------------------------------- reading
def write_video(path, pix_fmt: str, codec: str, size=(32, 48), frames=9):
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=16)
        s.height, s.width = size
        s.pix_fmt = pix_fmt
        for _ in range(frames):
            rgba = np.random.default_rng(0).integers(0, 255, (*size, 4), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(rgba, format="rgba").reformat(format=pix_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_reading_says_in_one_line_what_it_did_to_the_frames(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdv2_lab.io.video")
    write_synthetic_clip(tmp_path / "square.mp4", frames=9, height=128, width=128)
    load_video(tmp_path / "square.mp4", height=64, width=96)
    write_video(tmp_path / "alpha.mov", "rgba", "png")
    load_video(tmp_path / "alpha.mov", height=32, width=48)
    write_video(tmp_path / "gray.mkv", "gray", "ffv1")
    load_video(tmp_path / "gray.mkv", height=32, width=48)
    load_video(tmp_path / "alpha.mov", height=32, width=48)
    lines = [r.getMessage() for r in caplog.records if r.name == "sdv2_lab.io.video"]
    assert len(lines) == 4, lines                                       # one line per file read
    assert "resized 128x128 -> 96x64" in lines[0] and "aspect ratio changed" in lines[0]
    assert "alpha channel dropped (rgba)" in lines[1]
    assert "grayscale (gray) converted to RGB" in lines[2]
    write_synthetic_clip(tmp_path / "exact.mp4", frames=9, height=32, width=48)
    caplog.clear()
    load_video(tmp_path / "exact.mp4", height=32, width=48)
    assert not [r for r in caplog.records if r.name == "sdv2_lab.io.video"]   # used as it is: nothing to say


def test_a_long_prompt_on_the_default_text_encoder_is_said_to_be_truncated(caplog):
    from sdv2_lab.text.hashed import HashedTextEncoder
    enc = HashedTextEncoder()
    long = " ".join(f"word{i}" for i in range(2000))
    a = enc.encode(long)
    enc.encode(long)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2000 words" in warnings[0] and "truncated" in warnings[0]
    assert torch.equal(a, enc.encode(" ".join(long.split()[:512])))   # truncated indeed
    assert not torch.equal(enc.encode("a short prompt"), a)


# ---------------------------------------------------------------------------------------------- one warning each
def test_dummy_weights_are_said_once_per_build(caplog):
    from sdv2_lab.build import build_pipeline, compose_config
    caplog.set_level(logging.WARNING)
    build_pipeline(compose_config("config", ["height=32", "width=48"]))
    dummy = [r.getMessage() for r in caplog.records if "DUMMY" in r.getMessage()]
    assert len(dummy) == 1 and "DiT, VAE, text encoder" in dummy[0]


def test_missing_metric_weights_are_said_once_each_and_briefly(caplog):
    from omegaconf import OmegaConf

    from sdv2_lab.metrics import build_metrics
    caplog.set_level(logging.WARNING)
    build_metrics(OmegaConf.load(Path(__file__).parents[1] / "conf" / "metrics" / "default.yaml"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2                                      # CLIP (two metrics, one file) and LPIPS
    assert all(len(line) < 260 for line in lines), [len(line) for line in lines]
    assert any("metrics.clip.weights=/path/to/clip-vit-base-patch32" in line for line in lines)
    assert any("metrics.lpips.backbone_weights=/path/to/alexnet-owt-7be5be79.pth" in line for line in lines)


def test_no_wandb_anonymous_setting_and_no_lightning_tips():
    from omegaconf import OmegaConf

    from sdv2_lab.eval.cli import make_logger, quiet_lightning
    cfg = OmegaConf.create({"logger": {"_target_": "lightning.pytorch.loggers.WandbLogger", "offline": True,
                                       "project": "p", "save_dir": "."}})
    assert "anonymous" not in make_logger(cfg)._wandb_init
    quiet_lightning()
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                            "💡 Tip: For seamless cloud logging ...", None, None)
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(tip)


# ---------------------------------------------------------------------------------------------- summaries, tables
def test_summary_averages_measures_only():
    from sdv2_lab.eval.module import summarise
    rows = pd.DataFrame([
        {"video": "a", "status": "ok", "seed": 0, "frames": 17, "input_frames": 17, "output_frames": 17,
         "input_fps": 16.0, "source_height": 64, "e2e_fps": 2.0, "ssim": 0.5},
        {"video": "b", "status": "ok", "seed": 1, "frames": 33, "input_frames": 33, "output_frames": 33,
         "input_fps": 30.0, "source_height": 128, "e2e_fps": 4.0, "ssim": 0.7},
        {"video": "c", "status": "skipped", "error": "too short"}])
    summary = summarise(rows)
    assert summary["e2e_fps"] == 3.0 and summary["ssim"] == pytest.approx(0.6)
    for col in ("seed", "frames", "input_fps", "source_height", "input_frames", "output_frames"):
        assert col not in summary, col
    assert summary["output_frames_total"] == 50 and (summary["videos"], summary["skipped"]) == (2, 1)


def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    for job, steps in (("0", 1), ("1", 2)):
        writer = ResultsWriter(root / job, context={"steps": steps, "backbone": "tiny", "hostname": "h",
                                                    **{f"extra_{i}": i for i in range(60)}})
        for video in ("a", "b"):
            writer.write({"video": video, "status": "ok", "e2e_fps": 1.0 * steps, "ttff_s": 0.5, "seed": 3})
        (root / job / ".hydra").mkdir()
        (root / job / ".hydra" / "overrides.yaml").write_text(f"- steps={steps}\n")
    return root


def test_results_cli_prints_one_compact_row_per_run_and_writes_every_column(tmp_path):
    root = sweep(tmp_path)
    res = subprocess.run([sys.executable, "-m", "sdv2_lab.eval.results", str(root)], capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr
    table = res.stdout.splitlines()[:3]
    assert table[0].split() == ["job", "steps", "videos", "skipped", "e2e_fps", "ttff_s"]
    assert [line.split()[:2] for line in table[1:]] == [["0", "1"], ["1", "2"]]
    assert all(len(line) < 120 for line in table)
    full = pd.read_csv(root / "all_results.csv")
    assert len(full) == 4 and "extra_59" in full and "hostname" in full
    assert compact_table(gather_results(root))["e2e_fps"].tolist() == [1.0, 2.0]


def test_skipped_videos_are_shown_with_their_reason(capsys, tmp_path):
    from sdv2_lab.eval.cli import print_results
    rows = pd.DataFrame([{"video": "a", "status": "ok", "e2e_fps": 2.0},
                         {"video": "short.mp4", "status": "skipped", "error": "short.mp4 has 3 frame(s)"}])
    print_results(rows, ["video", "e2e_fps"], tmp_path)
    out = capsys.readouterr().out
    assert "skipped short.mp4: short.mp4 has 3 frame(s)" in out and "NaN" not in out


# ---------------------------------------------------------------------------------------------- one whole run
def test_an_evaluation_run_says_each_thing_once(tmp_path, umask):
    """sdv2 eval on a folder with a clip and a still image: one DUMMY line, each missing metric once, no W&B or
    Lightning noise, the skipped image with its reason, files with the umask's mode."""
    import cv2
    clips = tmp_path / "clips"
    write_synthetic_clip(clips / "good.mp4", frames=9, height=32, width=48)
    cv2.imwrite(str(clips / "still.png"), np.zeros((32, 48, 3), np.uint8))
    (clips / "prompts.csv").write_text("path,prompt\ngood.mp4,a painting\nstill.png,a painting\n")
    res = subprocess.run([sys.executable, "-m", "sdv2_lab.eval", "dataset=folder", f"dataset.root={clips}",
                          "dataset.prompts_file=prompts.csv", "dataset.on_error=skip", "height=32", "width=48",
                          "eval.warmup=false", "eval.save_videos=1", "hydra.run.dir=run"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ENV)
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-3000:]
    assert console.count("DUMMY") == 1
    assert console.count("metrics.clip.weights=") == 1 and console.count("metrics.lpips.backbone_weights=") == 1
    assert "anonymous" not in console and "Tip:" not in console
    assert "skipped still.png: " in res.stdout and "is a single image (png), not a video" in res.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert "seed" not in summary and "frames" not in summary and summary["skipped"] == 1
    for path in (run / "summary.json", run / "results.csv", run / "videos" / "good.mp4"):
        assert mode(path) == 0o644, path


def test_the_definitions_live_in_the_repos_own_docs():
    root = Path(__file__).resolve().parents[1]
    readme, docs = (root / "README.md").read_text(), (root / "docs" / "metrics.md").read_text()
    assert "../shared" not in readme and "docs/metrics.md" in readme
    for term in ("Steady-state FPS", "End-to-end FPS", "Time to first frame", "Per-chunk latency", "MFU"):
        assert term in docs, term
