"""The evaluation loop: a LightningModule that streams each dataset video through the pipeline and measures it.

``trainer.test(StreamingEvalModule(cfg, run_dir), datamodule=EvalDataModule(...))`` — one ``VideoItem`` per
step. Per video, in this order:

1. **timed** — the clip is pushed chunk by chunk exactly as live input would arrive (``stream_clip``: CUDA
   events on GPU), giving end-to-end / steady-state / stage FPS, TTFF and per-chunk latency (design.md);
2. **untimed** — peak GPU memory, MFU from the analytic FLOP model (``flops.py``), quality metrics on the
   output against the input, an optional sample video;
3. the row is appended to ``results[.rank<k>].jsonl`` / ``.csv`` at once (a crash keeps every finished row)
   and its numbers are logged through Lightning (``self.log``: the experiment logger, W&B, CSV or none).

At the end rank 0 gathers every rank's rows (files, not collectives: ranks may hold unequal numbers of
videos), writes ``summary.json``, logs the summary through ``self.log`` (so ``trainer.callback_metrics`` holds
``summary/<measure>``: what a sweeper optimises) and a results table (numbers as numbers), and prints the table.
A run that fails or is interrupted still writes ``summary.json`` over the videos it finished (``finish``).

The pipeline is held outside Lightning's module tree on purpose: Lightning must neither move nor wrap it
(its weights may be dummy, bf16, CUDA-graphed; there is nothing to train).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from ..build import build_pipeline
from ..settings import compile_kernels, frame_flops, switch
from ..metrics import build_metrics
from .datasets import VideoItem
from ..flops import mfu, peak_bf16_tflops
from .results import ResultsWriter, read_jsonl, run_metadata, write_atomic
from ..stream.clips import stream_clips
from ..units import to_unit

log = logging.getLogger(__name__)


def config_choice(group: str, default: str) -> str:
    """The config file chosen for a group (``wan_tiny``), when running under Hydra; else ``default``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get(group, default))
    except Exception:  # noqa: BLE001 -- composed outside a Hydra app (API, tests)
        return default


def config_columns(cfg: DictConfig) -> dict:
    """The configuration every row carries (what a sweep varies), as flat columns."""
    return {"backbone": cfg.backbone.name, "vae": cfg.vae.name, "vae_config": config_choice("vae", cfg.vae.name),
            "attention": cfg.attention.name, "mode": cfg.mode.name, "num_gpus": gpus_per_stream(cfg),
            "steps": int(cfg.steps),
            "streams": int(cfg.streams), "overlap": switch(cfg, "overlap"),
            "height": int(cfg.height), "width": int(cfg.width), "num_kv_cache": int(cfg.num_kv_cache),
            "kv_cache_dtype": str(cfg.kv_cache_dtype),
            "sink_frames": int(cfg.sink_frames), "adapt_sink_threshold": float(cfg.adapt_sink_threshold),
            "noise_scale": float(cfg.noise_scale), "fixed_noise": bool(cfg.fixed_noise),
            "cuda_graph": switch(cfg, "cuda_graph"), "compile_kernels": compile_kernels(cfg),
            "weights": cfg.weights.kind, "dataset": cfg.dataset.name}


def gpus_per_stream(cfg: DictConfig) -> int:
    """GPUs one stream runs on: the pipe stages (mode=pipe), else 1."""
    if cfg.mode.name != "pipe":
        return 1
    from ..parallel.placement import pipe_world
    return pipe_world(cfg)


def to_unit_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> [T, 3, H, W] in [0, 1] (the metrics' layout)."""
    return to_unit(video).transpose(0, 1)


class StreamingEvalModule(pl.LightningModule):
    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: Optional[list[str]] = None):
        super().__init__()
        self.cfg, self.run_dir, self.overrides = cfg, Path(run_dir), list(overrides or [])
        self.pipe = None            # built in setup() on this rank's device
        self.metrics: list = []
        self.missing_metrics: dict[str, str] = {}
        self.writer: Optional[ResultsWriter] = None
        self.results: Optional[pd.DataFrame] = None   # all ranks' rows, on rank 0 after the run
        self._videos_saved = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device(self.cfg.device)
        cfg = self.cfg.copy()
        cfg.device = str(device)
        object.__setattr__(self, "pipe", build_pipeline(cfg))  # not a submodule (see the module docstring)
        metrics_cfg = OmegaConf.to_container(self.cfg.metrics, resolve=True)
        metrics_cfg.setdefault("device", "cpu")
        if metrics_cfg.get("device") == "auto":
            metrics_cfg["device"] = str(device)
        self.metrics, self.missing_metrics = build_metrics(metrics_cfg)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        context = {**run_metadata(), **config_columns(self.cfg), "overrides": " ".join(self.overrides),
                   "weights": "dummy" if self.pipe.weights_are_dummy else "real"}
        self.writer = ResultsWriter(self.run_dir, name="results" if world == 1 else f"results.rank{rank}",
                                    context=context)

    def on_test_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and self.trainer.is_global_zero:  # items the dataset refused up front
            for video_id, reason in datamodule.skipped:
                self.writer.write({"video": video_id, "status": "skipped", "error": reason})
        if self.cfg.eval.warmup and self.pipe.warmup_s is None:   # the build warms up on CUDA (warmup=auto)
            self.pipe.warm_up()   # first-call costs (autotuning, graph capture) must not land in a video's TTFF

    # ------------------------------------------------------------------ one video
    def test_step(self, item: VideoItem, batch_idx: int) -> dict:
        if item.error is not None:  # skipped by the dataset (on_error=skip): recorded, never silent
            return self.writer.write({"video": item.id, "path": item.path, "status": "skipped", "error": item.error})
        cuda = self.pipe.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.pipe.device)
        frames = item.frames.to(self.pipe.device)
        # --- timed region: streaming only. streams=S: the video as S concurrent streams (seeds 0..S-1) sharing
        # one DiT call per step; the row reports the per-stream mean and the total
        streams = self.pipe.cfg.max_streams
        try:
            result = stream_clips(self.pipe, [frames] * streams, [item.prompt] * streams, seeds=list(range(streams)),
                                  input_fps=item.fps, keep_output=True)
        except Exception as exc:
            raise RuntimeError(f"video {item.id!r} ({item.path or 'generated'}): {exc}") from exc
        output, stats = result.outputs[0], per_stream_mean(result.per_stream)
        if streams > 1:
            stats.update({f"total_{k}": v for k, v in result.total.items() if k.endswith("_fps")})
        # --- untimed: everything else
        row = {"video": item.id, "path": item.path, "prompt": item.prompt, "status": "ok", "input_fps": item.fps,
               **{k: v for k, v in item.meta.items() if isinstance(v, (int, float, str, bool))}, **stats}
        if cuda:
            row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.pipe.device) / 2 ** 30
        row.update(self._mfu(stats))
        row.update(self._quality(frames.cpu(), output, item.prompt))
        if self._videos_saved < int(self.cfg.eval.save_videos) and output is not None:
            try:  # a sample is a convenience: failing to write one (e.g. no PyAV) must not lose the row
                row["sample_video"] = self._save_video(item.id, output)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not write the sample video of %s: %s: %s", item.id, type(exc).__name__, exc)
                row["sample_video_error"] = f"{type(exc).__name__}: {exc}"
        row = self.writer.write(row)
        if self._trainer is not None:   # per video, to the logger (on_step); no collective: ranks hold unequal counts
            self.log_dict({f"video/{k}": v for k, v in numbers(row).items()}, on_step=True, on_epoch=False,
                          batch_size=1)
        return row

    def _mfu(self, stats: dict) -> dict:
        cfg = self.cfg
        flops = frame_flops(cfg)
        out = flops.as_dict()
        device = self.pipe.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak, source = peak_bf16_tflops(name, cfg.eval.peak_tflops) if device.type == "cuda" else (None, "cpu")
        out["peak_tflops"], out["peak_source"] = peak, source
        fps = stats.get("steady_fps")
        fps = float("nan") if fps is None else fps
        dit_fps = stats.get("dit_fps", float("nan"))
        if peak and math.isfinite(fps):
            out["mfu"] = mfu(flops, fps, peak * 1e12)
            if math.isfinite(dit_fps):
                out["mfu_dit"] = mfu(flops.dit, dit_fps, peak * 1e12)
        return out

    def _quality(self, frames: torch.Tensor, output: Optional[torch.Tensor], prompt: str) -> dict:
        """Every available metric on (input, output) frames; a metric that fails is recorded as an error and
        the others still run. Metrics without weights are listed in ``metrics_missing`` (never 0)."""
        row: dict = {}
        if self.missing_metrics:
            row["metrics_missing"] = ",".join(sorted(self.missing_metrics))
        if output is None or not self.metrics:
            return row
        outputs = output.float().permute(0, 3, 1, 2)                  # [T, 3, H, W] in [0, 1]
        inputs = to_unit_frames(frames)[: outputs.shape[0]]
        if inputs.shape[0] != outputs.shape[0]:
            raise RuntimeError(f"{outputs.shape[0]} output frames for {inputs.shape[0]} input frames")
        for metric in self.metrics:
            try:
                row.update(metric(inputs, outputs, prompt))
            except Exception as exc:  # noqa: BLE001 -- one broken metric must not lose the video's row
                log.warning("metric %s failed: %s: %s", metric.name, type(exc).__name__, exc)
                row[f"{metric.name}_error"] = f"{type(exc).__name__}: {exc}"
        return row

    def _save_video(self, video_id: str, output: torch.Tensor) -> str:
        from ..io.video import export_video
        path = self.run_dir / "videos" / f"{Path(video_id).stem}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        export_video(output.numpy(), str(path), fps=int(self.cfg.fps))
        self._videos_saved += 1
        if self.logger is not None and hasattr(self.logger, "log_video"):
            try:
                self.logger.log_video(f"samples/{video_id}", videos=[str(path)])
            except Exception as exc:  # noqa: BLE001 -- a logger hiccup must not lose results
                log.warning("could not log the sample video to %s: %s", type(self.logger).__name__, exc)
        return str(path)

    # ------------------------------------------------------------------ the end
    def on_test_epoch_end(self) -> None:
        self.trainer.strategy.barrier()
        if not self.trainer.is_global_zero:
            return
        summary = self.finish("complete")
        self.log_dict({f"summary/{k}": v for k, v in numbers(summary).items()}, rank_zero_only=True)
        if self.logger is not None and hasattr(self.logger, "log_table") and len(self.results):
            try:
                self.logger.log_table("results", dataframe=loggable_table(self.results))
            except Exception as exc:  # noqa: BLE001
                log.warning("could not log the results table: %s", exc)

    def finish(self, status: str = "complete") -> dict:
        """Gather every rank's rows into ``self.results`` and write ``summary.json`` (with ``status``: complete,
        interrupted or failed). Rank 0; also called when a run stops early, over the videos finished."""
        rows = []
        for path in sorted(self.run_dir.glob("results*.jsonl")):
            rows += read_jsonl(path)
        self.results = pd.DataFrame(rows)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and len(self.results):  # one table for the whole run, in dataset order
            self.results = self.results.sort_values("video", kind="stable").reset_index(drop=True)
            write_atomic(self.run_dir / "results.csv", lambda f: self.results.to_csv(f, index=False))
        summary = summarise(self.results, constant=set(config_columns(self.cfg)) | set(run_metadata()))
        summary["status"] = status
        summary["metrics_missing"] = self.missing_metrics
        write_atomic(self.run_dir / "summary.json",
                     lambda f: json.dump(summary, f, indent=2, default=str, allow_nan=True))
        return summary

    def teardown(self, stage: str) -> None:
        """Free the models: a Hydra multirun runs its jobs in one process, and the next job's 14B pipeline does
        not fit beside this one."""
        object.__setattr__(self, "pipe", None)
        self.metrics = []
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# Row columns that describe a video or the run rather than measure it: never averaged into the summary.
DESCRIPTIVE = {"seed", "frames", "input_fps", "input_frames", "output_frames", "chunks_out",
               "dropped_trailing_frames", "peak_tflops", "gpu_count"}


def numbers(row: dict) -> dict:
    """The finite numbers of a row (what a logger can plot); booleans, text and n/a left out."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def loggable_table(results: pd.DataFrame) -> pd.DataFrame:
    """The results for a logger's table: numeric and boolean columns as they are (W&B plots and sorts them),
    the rest as text (mixed columns would be refused), missing cells empty."""
    table = results.copy()
    for col in table.columns:
        if pd.api.types.is_numeric_dtype(table[col]) or pd.api.types.is_bool_dtype(table[col]):
            continue
        table[col] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in table[col]]
    return table


def is_measure(column: str) -> bool:
    return column not in DESCRIPTIVE and not column.startswith("source_")


def per_stream_mean(rows: list[dict]) -> dict:
    """One stream's numbers, or the mean over streams (latencies: the worst stream's)."""
    if len(rows) == 1:
        return dict(rows[0])
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = max(vals) if k.startswith("latency_") else sum(vals) / len(vals)
    return out


def summarise(results: pd.DataFrame, constant: set[str] = frozenset()) -> dict:
    """Counts, the run's configuration (``constant`` columns, taken as they are), frame totals, and the mean
    over the finished videos of every measured column (speed, latency, memory, MFU, quality). What describes a
    video (its seed, frame counts, source size, input fps) is not averaged."""
    if results.empty:
        return {"videos": 0, "skipped": 0}
    ok = results[results["status"] == "ok"] if "status" in results else results
    out = {"videos": int(len(ok)), "skipped": int(len(results) - len(ok))}
    for col in results.columns:
        if col in constant:
            out[col] = results[col].iloc[0].item() if hasattr(results[col].iloc[0], "item") else results[col].iloc[0]
            continue
        if col in ("input_frames", "output_frames") and col in ok:
            out[f"{col}_total"] = int(pd.to_numeric(ok[col], errors="coerce").fillna(0).sum())
        if not is_measure(col):
            continue
        values = pd.to_numeric(ok[col], errors="coerce") if col in ok else None
        if values is not None and ok[col].dtype != bool and values.notna().any():
            out[col] = float(values.mean())
    for col in [c for c in results.columns if c.endswith("_note") and c in ok]:   # a measure n/a, and why
        notes, measure = ok[col].dropna(), col[: -len("_note")]
        if len(notes) and measure in out:
            out[col] = f"{len(notes)} of {len(ok)} video(s): {notes.iloc[0]}"
        elif len(notes):
            out[measure], out[col] = None, str(notes.iloc[0])
    return out
