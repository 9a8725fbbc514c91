"""The evaluation harness end to end on CPU (tiny model, dummy weights): rows, summary, logger, sample videos,
metrics recorded as missing (not 0), crash safety, skipped items, data-parallel ranks, config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdv2_lab.build import compose_config
from sdv2_lab.eval.cli import evaluate
from sdv2_lab.eval.results import read_jsonl
from sdv2_lab.io.synthetic import write_synthetic_clip

FAST = ["eval.warmup=false"]
SHORT = "dataset.frames=13"  # synthetic clips: 5 + 2 x 4 frames


def eval_cfg(tmp_path: Path, *overrides: str):
    return compose_config("eval", [f"output.dir={tmp_path}", *FAST, *overrides])


def test_eval_rows_summary_wandb_and_samples(tmp_path):
    cfg = eval_cfg(tmp_path, "dataset.n=2", SHORT, f"logger.save_dir={tmp_path}", "eval.save_videos=1")
    results = evaluate(cfg, tmp_path, ["dataset.n=2"])
    assert list(results["video"]) == ["synthetic_000", "synthetic_001"]
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 2 and (csv["weights"] == "dummy").all() and (csv["status"] == "ok").all()
    for col in ["e2e_fps", "steady_fps", "ttff_s", "ttff_compute_s", "ttff_buffer_s", "latency_p50_ms",
                "latency_p95_ms", "latency_max_ms", "encode_fps", "dit_fps", "decode_fps", "flops_per_frame_total",
                "warp_error_float", "warp_error_uint8", "flicker", "ssim", "psnr", "steps", "vae", "backbone", "gpu",
                "torch", "commit", "overrides"]:
        assert col in csv.columns, col
    assert (csv["e2e_fps"] > 0).all() and (csv["ttff_s"] > csv["ttff_compute_s"]).all()
    assert (csv["output_frames"] == 13).all()
    # CPU: no peak FLOP/s, so no MFU (never an invented one); metrics without weights are missing, not 0
    assert "mfu" not in csv.columns and "clip_consistency" not in csv.columns and "lpips" not in csv.columns
    assert set(csv["metrics_missing"].iloc[0].split(",")) == {"clip_consistency", "clip_score", "lpips"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["videos"] == 2 and summary["skipped"] == 0 and summary["steps"] == 2
    assert summary["e2e_fps"] == pytest.approx(csv["e2e_fps"].mean())
    assert set(summary["metrics_missing"]) == {"clip_consistency", "clip_score", "lpips"}
    assert (tmp_path / "videos" / "synthetic_000.mp4").stat().st_size > 0
    assert not (tmp_path / "videos" / "synthetic_001.mp4").exists()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))


def write_folder(root: Path, bad: str) -> Path:
    """a.mp4 is fine; b.mp4 is ``short`` (3 frames: fails mid-run, after a.mp4's row) or ``corrupt``."""
    root.mkdir()
    write_synthetic_clip(root / "a.mp4", frames=13, height=64, width=96)
    if bad == "short":
        write_synthetic_clip(root / "b.mp4", frames=3, height=64, width=96)
    else:
        (root / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"path": "a.mp4", "prompt": "a red square"}\n{"path": "b.mp4", "prompt": "a blue one"}\n')
    return prompts


def test_crash_mid_run_keeps_finished_rows(tmp_path):
    prompts = write_folder(tmp_path / "clips", bad="short")
    run = tmp_path / "run"
    cfg = eval_cfg(run, "dataset=folder", f"dataset.root={tmp_path / 'clips'}", f"dataset.prompts_file={prompts}",
                   "logger=none", "metrics=none", "eval.save_videos=0")
    with pytest.raises(RuntimeError, match=r"b\.mp4.*shorter than the first chunk"):
        evaluate(cfg, run)
    rows = read_jsonl(run / "results.jsonl")
    assert [r["video"] for r in rows] == ["a.mp4"] and rows[0]["status"] == "ok"
    assert len(pd.read_csv(run / "results.csv")) == 1


def test_skip_mode_records_the_skipped_video(tmp_path):
    prompts = write_folder(tmp_path / "clips", bad="corrupt")
    run = tmp_path / "run"
    cfg = eval_cfg(run, "dataset=folder", f"dataset.root={tmp_path / 'clips'}", f"dataset.prompts_file={prompts}",
                   "dataset.on_error=skip", "logger=csv", f"logger.save_dir={run}", "metrics=none",
                   "eval.save_videos=0")
    results = evaluate(cfg, run)
    assert sorted(results["status"]) == ["ok", "skipped"]
    assert "b.mp4" in results.set_index("status").loc["skipped", "error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["videos"] == 1 and summary["skipped"] == 1
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()


def sdv2(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "sdv2_lab.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_data_parallel_ranks_split_the_videos_and_rank0_gathers(tmp_path):
    """Two CPU processes (gloo) through Lightning's DDP launcher: 3 videos split 2 + 1, none twice, one table."""
    run = tmp_path / "ddp"
    p = sdv2(["eval", "trainer.devices=2", "trainer.strategy=ddp", "dataset.n=3", "logger=none", "metrics=none",
              *FAST, SHORT, "eval.save_videos=0", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    per_rank = [read_jsonl(run / f"results.rank{r}.jsonl") for r in (0, 1)]
    assert sorted(len(rows) for rows in per_rank) == [1, 2]
    merged = pd.read_csv(run / "results.csv")
    assert list(merged["video"]) == ["synthetic_000", "synthetic_001", "synthetic_002"]
    assert json.loads((run / "summary.json").read_text())["videos"] == 3


def test_unknown_choice_lists_the_valid_ones(tmp_path):
    p = sdv2(["eval", "vae=nope"], tmp_path, timeout=120)
    assert p.returncode != 0
    assert "nope" in p.stderr and "wan_tiny" in p.stderr and "taehv" in p.stderr


def test_sweep_through_the_submitit_launcher_and_slurm_config(tmp_path):
    """hydra/launcher=local runs a sweep's jobs through submitit (as hydra/launcher=slurm would on a cluster);
    gather_results joins them with their overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sdv2_lab.build import CONF_DIR
    from sdv2_lab.eval.results import gather_results

    sweep = tmp_path / "sweep"
    p = sdv2(["eval", "-m", "hydra/launcher=local", "steps=1,2", "logger=none", "metrics=none", "dataset.n=1", SHORT,
              *FAST, "eval.save_videos=0", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()
    df = gather_results(sweep)
    assert sorted(df["steps"]) == [1, 2] and (df["status"] == "ok").all()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.gpus_per_node == 1


def test_models_are_freed_after_the_run(tmp_path, monkeypatch):
    """A multirun runs its jobs in one process: each job's pipeline must be gone before the next is built."""
    import gc
    import weakref

    from sdv2_lab.eval import module
    built = []

    def spy(cfg):
        pipe = build(cfg)
        built.append(weakref.ref(pipe.dit))
        return pipe
    build = module.build_pipeline
    monkeypatch.setattr(module, "build_pipeline", spy)
    evaluate(eval_cfg(tmp_path, "dataset.n=1", SHORT, "logger=none", "metrics=none", "eval.save_videos=0"), tmp_path)
    gc.collect()
    assert len(built) == 1 and built[0]() is None


def test_result_rows_say_which_fast_paths_ran_not_the_raw_auto():
    """``cuda_graph`` / ``overlap`` default to ``auto``: a row records what ran on its device (on a CPU neither),
    not ``bool("auto")``."""
    from sdv2_lab.build import compose_config
    from sdv2_lab.eval.module import config_columns
    cpu = config_columns(compose_config("eval", ["device=cpu"]))
    assert cpu["cuda_graph"] is False and cpu["overlap"] is False
    cuda = config_columns(compose_config("eval", ["device=cuda", "overlap=false"]))
    assert cuda["cuda_graph"] is True and cuda["overlap"] is False
    assert cpu["compile_kernels"] is False  # eager (reference-exact) on a CPU


def test_compile_kernels_auto_is_on_for_cuda_with_triton_only(monkeypatch):
    import importlib.util

    from sdv2_lab.build import compose_config
    from sdv2_lab.settings import compile_kernels, describe_paths
    cuda, cpu = compose_config("config", ["device=cuda"]), compose_config("config", ["device=cpu"])
    real_find_spec = importlib.util.find_spec
    for triton in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (real_find_spec("torch") if triton else None) if name == "triton"
                            else real_find_spec(name, *a))
        assert compile_kernels(cuda) is triton
        assert ("compiled elementwise kernels" in describe_paths(cuda)) is triton
        assert compile_kernels(cpu) is False
    assert compile_kernels(compose_config("config", ["device=cpu", "compile_kernels=true"])) is True
    assert compile_kernels(compose_config("config", ["device=cuda", "compile_kernels=false"])) is False
    with pytest.raises(ValueError, match="compile_kernels='yes': expected auto, true or false"):
        compile_kernels(compose_config("config", ["device=cuda", "compile_kernels=yes"]))
