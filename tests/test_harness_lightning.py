"""The harness as lightning-hydra-template users expect it: the Trainer from the trainer/ group (any argument passes
through), callbacks/, debug/, paths/ and local/ groups, a user's own config folder on hydra.searchpath, results
through self.log (trainer.callback_metrics) and the summary metric returned to Hydra; W&B online when asked,
CSV without the wandb package, the results table as numbers; steady_fps n/a with its reason."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.loggers import Logger

from sdv2_lab.build import compose_config
from test_user_checkpoint import tiny_root  # noqa: F401  (the session fixture)

FAST = ["eval.warmup=false", "metrics=none", "eval.save_videos=0", "height=32", "width=48"]


class RecordingLogger(Logger):
    """A Lightning logger that keeps what it is given (``logger._target_=test_harness_lightning.RecordingLogger``)."""
    runs: list = []

    def __init__(self, save_dir=".", name="rec"):
        super().__init__()
        self._save_dir, self._name = save_dir, name
        self.metrics, self.tables = [], []
        RecordingLogger.runs.append(self)

    name = property(lambda self: self._name)
    version = property(lambda self: 0)
    save_dir = property(lambda self: self._save_dir)

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_table(self, key, dataframe=None, **kwargs):
        self.tables.append((key, dataframe))


def test_the_trainer_is_instantiated_from_its_group_with_any_argument(tmp_path):
    from lightning.pytorch.profilers import SimpleProfiler

    from sdv2_lab.eval.cli import build_trainer
    cfg = compose_config("eval", [f"output.dir={tmp_path}", "trainer.precision=bf16-mixed", "trainer.profiler=simple",
                                  "+trainer.limit_test_batches=2", "logger=none"])
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.precision == "bf16-mixed" and isinstance(trainer.profiler, SimpleProfiler)
    assert trainer.limit_test_batches == 2 and trainer.default_root_dir == str(tmp_path)
    none = build_trainer(compose_config("eval", ["callbacks=none", "logger=none", "trainer.enable_progress_bar=false"]),
                         tmp_path)
    assert none.progress_bar_callback is None


def test_a_run_logs_through_lightning_and_returns_the_summary_metric(tmp_path):
    """+trainer.limit_test_batches=2 evaluates 2 of 3 videos; the numbers reach trainer.callback_metrics and the
    logger through self.log, the results table keeps numbers as numbers, and the Hydra task function returns
    optimized_metric (what an Optuna sweep maximises)."""
    from sdv2_lab.eval import cli
    RecordingLogger.runs.clear()
    cfg = compose_config("eval", [f"output.dir={tmp_path}", *FAST, "dataset.n=3", "dataset.frames=13", "steps=1",
                                  "+trainer.limit_test_batches=2", "logger=csv",
                                  "logger._target_=test_harness_lightning.RecordingLogger",
                                  f"logger.save_dir={tmp_path}", "optimized_metric=summary/e2e_fps"])
    value = cli._main(cfg)   # Hydra's task function, given a config
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["videos"] == 2 and summary["status"] == "complete"
    assert value == pytest.approx(summary["e2e_fps"], rel=1e-5) and value > 0
    (logger,) = RecordingLogger.runs
    per_video = [m for step, m in logger.metrics if "video/e2e_fps" in m]
    assert [m["video/e2e_fps"] for m in per_video] == pytest.approx(
        pd.read_csv(tmp_path / "results.csv")["e2e_fps"].tolist(), rel=1e-5)
    assert any(m.get("summary/steady_fps") == pytest.approx(summary["steady_fps"], rel=1e-5) for _, m in logger.metrics)
    (key, table), = logger.tables
    assert key == "results" and pd.api.types.is_float_dtype(table["e2e_fps"]) and table["steps"].dtype.kind == "i"
    metrics: dict = {}
    from sdv2_lab.eval.cli import evaluate
    evaluate(compose_config("eval", [f"output.dir={tmp_path / 'b'}", *FAST, "dataset.n=1", "dataset.frames=9",
                                     "steps=1", "logger=none"]), tmp_path / "b", metrics=metrics)
    assert metrics["summary/videos"] == 1 and metrics["summary/e2e_fps"] > 0


def test_the_groups_of_the_template_and_a_users_own_config_folder(tmp_path):
    debug = compose_config("eval", ["debug=default"])
    assert (debug.dataset.n, debug.logger.get("_target_"), dict(debug.callbacks or {})) == (1, None, {})
    assert debug.trainer.limit_test_batches == 1 and not debug.eval.warmup
    assert compose_config("eval", ["debug=profiler"]).trainer.profiler == "simple"
    assert compose_config("eval", ["debug=fdr"]).trainer.fast_dev_run is True
    assert compose_config("eval", ["trainer=ddp"]).trainer.strategy == "ddp"
    assert compose_config("eval").callbacks.progress_bar._target_.endswith("TQDMProgressBar")
    paths = compose_config("eval", ["paths.log_dir=/scratch/me"], return_hydra_config=True)
    assert str(paths.hydra.run.dir).startswith("/scratch/me/eval/")
    mine = tmp_path / "my_conf"
    (mine / "local").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "local" / "default.yaml").write_text("# @package _global_\nseed: 7\n")
    (mine / "experiment" / "mine.yaml").write_text("# @package _global_\nsteps: 3\n")
    for name in ("config", "eval"):
        cfg = compose_config(name, [f"hydra.searchpath=[file://{mine}]", "experiment=mine"])
        assert (cfg.seed, cfg.steps) == (7, 3)


def test_every_sweep_ends_with_its_table(tmp_path):
    """A -m sweep prints one row per job and writes all_results.csv (Hydra's multirun-end callback), without a
    second command; the run's metric is what each job returned."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    sweep = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "sdv2_lab.cli", "eval", "-m", "steps=1,2", "debug=default",
                          "dataset.frames=9", "height=32", "width=48", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    after = res.stdout.split(f"sweep {sweep}:", 1)[1].splitlines()
    header = after[1].split()
    assert header[:4] == ["job", "steps", "videos", "skipped"] and "e2e_fps" in header
    assert [line.split()[:2] for line in after[2:4]] == [["0", "1"], ["1", "2"]]
    assert f"wrote {sweep / 'all_results.csv'}" in res.stdout
    assert len(pd.read_csv(sweep / "all_results.csv")) == 2


# ---------------------------------------------------------------------------------------------- loggers
def wandb_cfg(**logger):
    from omegaconf import OmegaConf
    return OmegaConf.create({"logger": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p",
                                        "save_dir": ".", **logger}})


def test_wandb_is_online_when_asked_and_leaves_wandb_mode_alone(monkeypatch):
    from sdv2_lab.eval.cli import make_logger
    monkeypatch.setenv("WANDB_MODE", "offline")   # as CI sets it: logger.offline=false still means online
    assert make_logger(wandb_cfg(offline=False))._wandb_init["mode"] == "online"
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert make_logger(wandb_cfg(offline=True))._wandb_init["mode"] == "offline"
    assert make_logger(wandb_cfg(offline=None))._wandb_init["mode"] == "offline"   # the default: offline
    assert "WANDB_MODE" not in os.environ          # Lightning's offline=True would have set it for the process
    monkeypatch.setenv("WANDB_MODE", "online")     # the user's own setting, under the default
    assert make_logger(wandb_cfg(offline=None))._wandb_init["mode"] == "online"


def test_a_core_install_without_wandb_logs_to_csv_and_says_so(tmp_path):
    """The default `sdv2 eval` (logger=wandb) where the wandb package is missing."""
    code = ("import sys; sys.modules['wandb'] = None\n"      # `import wandb` fails, as on a core install
            "from sdv2_lab.cli import main\n"
            f"main(['eval', 'dataset.n=1', 'dataset.frames=9', 'hydra.run.dir=run', *{FAST!r}])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "W&B" in ln]
    assert len(said) == 1 and "W&B is not installed" in said[0] and "CSV" in said[0], said
    assert (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_results_table_for_a_logger_keeps_numbers():
    from sdv2_lab.eval.module import loggable_table
    rows = pd.DataFrame([{"video": "a", "steps": 2, "e2e_fps": 3.5, "steady_fps": None, "ok": True, "mixed": 1},
                         {"video": "b", "steps": 2, "e2e_fps": 4.0, "steady_fps": 2.0, "ok": False, "mixed": "x"}])
    table = loggable_table(rows)
    assert table["steps"].dtype.kind == "i" and table["e2e_fps"].dtype.kind == "f" and table["ok"].dtype == bool
    assert math.isnan(table["steady_fps"][0]) and table["steady_fps"][1] == 2.0
    assert list(table["mixed"]) == ["1", "x"] and list(table["video"]) == ["a", "b"]


# ---------------------------------------------------------------------------------------------- steady state
def timer_with_chunks(chunks: int):
    from sdv2_lab.stream.timing import ChunkIn, ChunkOut, Clock, Mark, StreamTimer
    import torch
    timer = StreamTimer(Clock("cpu"), stream=0)
    for i in range(chunks):
        frames = 5 if i == 0 else 4
        timer(ChunkIn(0, frames, Mark(host=timer.clock.origin_host + i)))
        timer(ChunkOut(0, torch.zeros(frames, 2, 2, 3), Mark(host=timer.clock.origin_host + i + 0.5)))
    return timer


def test_steady_fps_is_na_with_the_frames_needed_not_nan():
    from sdv2_lab.report import format_stats
    short = timer_with_chunks(4).summary(warmup_chunks=4, input_fps=16, first_chunk_frames=5)   # 17 frames, 4 steps
    assert short["steady_fps"] is None
    assert short["steady_fps_note"] == "n/a: clip too short for a steady state (needs 21 frames)"
    assert "steady-state FPS n/a: clip too short for a steady state (needs 21 frames)" in format_stats(short)
    assert "nan" not in format_stats(short).lower()
    enough = timer_with_chunks(5).summary(warmup_chunks=4, input_fps=16, first_chunk_frames=5)    # 21 frames
    assert enough["steady_fps"] > 0 and "steady_fps_note" not in enough


def test_the_default_clips_reach_a_steady_state_at_every_step_count():
    """The default dataset (and `sdv2 run`'s input) leaves at least two steady chunks after the warm-up of the
    largest step count the defaults sweep (`sdv2 eval -m steps=1,2,3,4`)."""
    cfg = compose_config("eval")
    first = 1 + 4 * cfg.frames_per_block
    for steps in range(1, len(cfg.denoising_step_list) + 1):
        needed = first + 4 * cfg.frames_per_block * (steps + 1)     # warm-up chunks + 2 steady ones
        assert cfg.dataset.frames >= needed and compose_config("config").input.frames >= needed, steps


def test_an_na_measure_reads_na_in_the_table_and_the_summary(capsys, tmp_path):
    from sdv2_lab.eval.cli import print_results
    from sdv2_lab.eval.module import summarise
    note = "n/a: clip too short for a steady state (needs 21 frames)"
    rows = pd.DataFrame([{"video": "a", "status": "ok", "e2e_fps": 2.0, "steady_fps": None, "steady_fps_note": note}])
    print_results(rows, ["video", "e2e_fps", "steady_fps"], tmp_path)
    out = capsys.readouterr().out
    assert "NaN" not in out and "n/a" in out.splitlines()[1] and f"steady_fps {note}" in out
    summary = summarise(rows)
    assert summary["steady_fps"] is None and summary["steady_fps_note"] == note


# ---------------------------------------------------------------------------------------------- files
def test_tiny_checkpoint_files_get_the_umasks_mode(tiny_root):
    from sdv2_lab.io.files import default_file_mode
    files = [p for p in tiny_root.rglob("*") if p.is_file() and p.name != "complete"]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != default_file_mode()} == {}


def test_ctrl_c_keeps_a_shorter_video_and_leaves_no_empty_folder(tmp_path):
    import numpy as np

    from sdv2_lab.io.video import Interrupted, VideoWriter, probe_video
    frames = np.zeros((3, 32, 48, 3), np.float32)
    with pytest.raises(Interrupted, match="kept the 3 frame"):
        with VideoWriter(tmp_path / "a" / "out.mp4") as writer:
            writer.write(frames)
            raise KeyboardInterrupt
    assert probe_video(tmp_path / "a" / "out.mp4").frames == 3
    with pytest.raises(Interrupted, match="nothing kept"):
        with VideoWriter(tmp_path / "b" / "c" / "out.mp4"):
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with VideoWriter(tmp_path / "d" / "out.mp4") as writer:
            writer.write(frames)
            raise ValueError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]   # folders made for a dropped file are gone


def test_prompt_files_with_a_byte_order_mark_are_read(tmp_path):
    from omegaconf import OmegaConf

    from sdv2_lab.inputs import read_prompt
    from sdv2_lab.eval.datasets import read_prompts_file
    for encoding in ("utf-16", "utf-8-sig", "utf-32"):
        (tmp_path / "p.txt").write_text("une peinture à l'huile\nsecond\n", encoding=encoding)
        cfg = OmegaConf.create({"input": {"prompt": None, "prompt_file": str(tmp_path / "p.txt")}})
        assert read_prompt(cfg) == "une peinture à l'huile"
        (tmp_path / "p.csv").write_text("path,prompt\na.mp4,café\n", encoding=encoding)
        assert [e.prompt for e in read_prompts_file(tmp_path / "p.csv")] == ["café"]
    (tmp_path / "p.csv").write_bytes("path,prompt\na.mp4,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"dataset.prompts_file .*p\.csv is not UTF-8 text \(byte 0xe9"):
        read_prompts_file(tmp_path / "p.csv")
