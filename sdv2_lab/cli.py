"""Command line: ``sdv2 <command> [hydra overrides]``.

    sdv2 run                                   # the embedded default: tiny model, CPU, a generated clip
    sdv2 run backbone=wan_1_3b weights=real device=cuda input=file input.video=in.mp4 input.prompt="..."
    sdv2 eval -m steps=1,2,3,4 vae=wan,taehv   # the harness (Hydra multirun sweep)

Every option lives in ``conf/``. A wrong override, file or setting ends in one line (an unknown key with the
nearest valid ones, an unknown choice with the valid ones) before any folder is made or model built; Ctrl-C ends
in one line (exit 130) saying what was kept (``entry.py``).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from .configs import CONF_DIR
from .entry import check_command_line, guard, offline_defaults, run_task

log = logging.getLogger("sdv2")


def read_prompt(cfg: DictConfig) -> str:
    prompt = cfg.input.get("prompt")
    pfile = cfg.input.get("prompt_file")
    if pfile:
        path = Path(pfile).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"input.prompt_file {path} not found (relative paths are taken from {Path.cwd()})")
        from .io.text import read_text
        lines = [ln.strip() for ln in read_text(path, "input.prompt_file").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"input.prompt_file {path} is empty: write the prompt on its first line")
        prompt = lines[0]  # as the reference: the first line
    if not prompt or not str(prompt).strip():
        raise ValueError("no prompt: set input.prompt=... or input.prompt_file=...")
    return str(prompt)


def first_chunk_frames(cfg: DictConfig) -> int:
    return 1 + 4 * int(cfg.frames_per_block)


def expected_output_frames(input_frames: int, cfg: DictConfig) -> Optional[int]:
    """Frames a clip of ``input_frames`` makes (whole chunks; the rest is dropped), None when unknown."""
    if not input_frames or input_frames < first_chunk_frames(cfg):
        return None
    per_chunk = 4 * int(cfg.frames_per_block)
    return 1 + per_chunk * ((input_frames - 1) // per_chunk)


def input_frames(cfg: DictConfig):
    """(frames or an iterator of frames [3, t, H, W] in [-1, 1], input fps, description, frame count or 0).
    A missing, unreadable, still-image or too-short input fails here, before any model is built."""
    if cfg.t2v:
        return None, float(cfg.fps), "text-to-video", int(cfg.num_frames)
    if cfg.input.kind == "synthetic":
        from .io.synthetic import synthetic_clip
        n = int(cfg.input.frames)
        if n < first_chunk_frames(cfg):
            raise ValueError(f"input.frames={n}: the first chunk needs {first_chunk_frames(cfg)} frames")
        video, _ = synthetic_clip(n, cfg.height, cfg.width, seed=cfg.seed)
        return video, float(cfg.input.fps), f"synthetic clip ({n} frames)", n
    from .io.video import iter_video_frames, probe_video
    info = probe_video(cfg.input.video)
    info.check_length(first_chunk_frames(cfg), "input.video")
    limit = cfg.input.get("max_frames")
    count = min(info.frames, limit) if limit and info.frames else (limit or info.frames)
    frames = iter_video_frames(cfg.input.video, height=cfg.height, width=cfg.width, max_frames=limit, batch=4)
    desc = f"{cfg.input.video} ({info.frames or 'unknown number of'} frames at {info.fps:.1f} fps)"
    return _until_damaged(frames), info.fps, desc, count


class _Damage:
    """An input cut short, in the process where ``run_checked`` runs: its stream ends at the cut and the error
    waits there to be reported. Anywhere else (a pipe rank, the API) the error is raised as it comes."""
    owner: Optional[int] = None
    errors: list = []


def _until_damaged(frames):
    """A file's frames up to where they stop decoding: the stream ends there, so that the pipeline flushes and
    the output is written with what was made; the error is reported after (``run_checked``)."""
    import os

    from .io.video import VideoDecodeError
    try:
        yield from frames
    except VideoDecodeError as exc:
        if _Damage.owner != os.getpid():
            raise
        _Damage.errors.append(exc)


def run_checked(cfg: DictConfig, **kwargs) -> dict:
    """``run`` for the command lines: an input cut short ends in its error (exit 1) after the frames before the
    cut were streamed and written."""
    import os
    _Damage.owner, _Damage.errors = os.getpid(), []
    try:
        stats = run(cfg, **kwargs)
    except ValueError as exc:
        if not _Damage.errors:
            raise
        raise ValueError(f"{_Damage.errors[0]}; nothing was written ({exc})") from None
    finally:
        _Damage.owner = None
    if _Damage.errors:
        raise ValueError(f"{_Damage.errors[0]}; {stats.get('output')} holds the {stats.get('output_frames')} "
                         f"frames made before it")
    return stats


def run(cfg: DictConfig, *, name: str = "sdv2 run",
        dummy_hint: str = "weights=real with the official files: README") -> dict:
    """Stream the input through the pipeline, write the mp4, print the timings. Everything that can be checked
    without the models (settings, weight files, input, output path) is checked first."""
    import torch
    from tqdm import tqdm

    from .build import build_pipeline
    from .io.files import check_output_file
    from .io.threads import BackgroundWriter, prefetch
    from .io.video import VideoWriter
    from .preflight import check_config
    from .stream.clips import stream_clip

    from .parallel.launch import launches
    if launches(cfg):  # mode=pipe on several GPUs: one process per stage (sdv2_lab/parallel/launch.py)
        from .parallel.launch import run as run_pipe
        return run_pipe(cfg)
    check_config(cfg)
    prompt = read_prompt(cfg)
    out_dir = Path(cfg.output.dir)
    out_path = check_output_file(out_dir / cfg.output.name, "output video")
    frames, in_fps, desc, count = input_frames(cfg)
    pipe = build_pipeline(cfg, announce=lambda line: print(f"{name}: {line}", flush=True), dummy_hint=dummy_hint)
    dummy = pipe.weights_are_dummy
    print(f"{name}: input: {desc}", flush=True)
    if not isinstance(frames, torch.Tensor) and frames is not None:  # decoded on a thread of its own, ahead of use
        pin = pipe.device.type == "cuda"
        frames = prefetch(frames, depth=8, prepare=(lambda t: t.pin_memory()) if pin else None)
    total = count if cfg.t2v else expected_output_frames(count, cfg)
    # the mp4 is encoded on a thread of its own: the loop that feeds the GPU never waits for the encoder
    with BackgroundWriter(VideoWriter(out_path, fps=cfg.fps)) as writer, \
            tqdm(desc="output frames", total=total, unit="f", mininterval=1.0, dynamic_ncols=True) as bar:
        if cfg.t2v:
            pipe.start(prompt)
            out = pipe.generate(cfg.num_frames)
            writer.write(out)
            bar.update(out.shape[0])
            stats = {"output_frames": out.shape[0]}
        else:
            _, stats = stream_clip(pipe, frames, prompt, input_fps=in_fps, on_frames=writer.write, progress=bar,
                                   keep_output=False, host_frames="uint8")
    stats.update(weights="dummy" if dummy else "real", output=str(out_path), device=str(pipe.device),
                 torch=torch.__version__, gpu=torch.cuda.get_device_name() if pipe.device.type == "cuda" else "cpu",
                 warmup_s=pipe.warmup_s, writer_waits=writer.waits)
    print(format_stats(stats))
    timings = cfg.output.get("timings", "timings.json")
    if timings:
        (out_dir / timings).write_text(json.dumps(stats, indent=1, default=str))
    return stats


def format_stats(s: dict) -> str:
    def f(key, fmt="{:.2f}", unit=""):
        v = s.get(key)
        return (s.get(f"{key}_note") or "n/a") if v is None else fmt.format(v) + unit
    return ("\n".join([
        f"wrote {s.get('output')} ({s.get('output_frames')} frames; weights: {s.get('weights')})",
        f"  end-to-end FPS {f('e2e_fps')}   steady-state FPS {f('steady_fps')}",
        f"  time to first frame {f('ttff_s', '{:.3f}', ' s')} (compute {f('ttff_compute_s', '{:.3f}', ' s')} + "
        f"buffering {f('ttff_buffer_s', '{:.3f}', ' s')})",
        f"  per-chunk latency p50 {f('latency_p50_ms', '{:.1f}', ' ms')}  p95 {f('latency_p95_ms', '{:.1f}', ' ms')}"
        f"  max {f('latency_max_ms', '{:.1f}', ' ms')}",
        f"  stages: encode {f('encode_fps', '{:.1f}', ' FPS')}  DiT {f('dit_fps', '{:.1f}', ' FPS')}  "
        f"decode {f('decode_fps', '{:.1f}', ' FPS')}",
    ]))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _run_main(cfg: DictConfig) -> None:
    run_task("sdv2 run", run_checked, cfg)   # one line for a mistake or Ctrl-C, not a traceback


def _serve_main() -> None:
    from .serve.main import main as serve_main   # the web UI (conf/serve.yaml); needs the `serve` extra
    serve_main()


COMMANDS = {"run": _run_main, "serve": _serve_main}
HELP = """usage: sdv2 <command> [key=value ...]

commands:
  run     stream one video (or a generated clip) through the pipeline: <output.dir>/output.mp4 + timings
  eval    the evaluation harness: every video of a dataset, speed and quality, results.csv / summary.json
  serve   the web UI on http://127.0.0.1:7860: a live webcam restyled in the browser (conf/serve.yaml)
  help    this text (also: sdv2 --help). `sdv2 run --help` / `sdv2 eval --help`: Hydra's full config listing

main options (Hydra overrides; an unknown choice is an error listing the valid ones):
{groups}
  device=cpu|cuda|cuda:k   height=H width=W (multiples of 16)   steps=1..4   seed=N   fps=N
  input=file input.video=in.mp4 input.prompt="..." | input.prompt_file=prompt.txt   (sdv2 run)
  weights=real weights.checkpoint=ckpts/wan_causal_dmd_v2v weights.wan_folder=wan_models/Wan2.1-T2V-1.3B
  dataset=folder dataset.root=clips dataset.prompts_file=prompts.csv                (sdv2 eval)
  -m key=a,b,...           a sweep (Hydra multirun): one output folder per combination, then one table
  trainer.precision=...  +trainer.limit_test_batches=2  debug=default   (sdv2 eval: Lightning's Trainer, a smoke run)
  hydra.searchpath=[file:///abs/my_conf]   your own config folders (experiment=..., local/default.yaml, ...)

examples:
  sdv2 run                                   # tiny model, CPU, a generated clip, dummy weights
  sdv2 run input=file input.video=in.mp4 input.prompt="a watercolor painting" steps=2 vae=taehv_tiny
  sdv2 eval -m steps=1,2,3,4
  ./run_v2v.sh single --video_path in.mp4 --prompt_file_path p.txt --step 2   # the reference's CLI

Metric definitions (FPS, TTFF, latency, MFU): docs/metrics.md. More: README.md."""


def config_groups() -> str:
    """One line per config group of conf/: its choices (the files in the group's folder)."""
    lines = []
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        choices = sorted(f.stem for f in folder.glob("*.yaml"))
        if not choices:
            continue
        lines.append(f"  {folder.name + '=':<16} {' | '.join(choices)}")
    return "\n".join(lines)


def print_help() -> None:
    print(HELP.format(groups=config_groups()))


CONFIGS = {"run": "config", "eval": "eval", "serve": "serve"}


def main(argv=None) -> None:
    guard("sdv2", _main, argv)


def _main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("help", "--help", "-h"):
        return print_help()
    cmd = "run"
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        cmd = argv.pop(0)
    if cmd not in CONFIGS:
        print_help()
        raise SystemExit(f"sdv2: unknown command {cmd!r}; commands: {', '.join([*CONFIGS, 'help'])}")
    offline_defaults()
    if cmd == "eval":
        from .eval.cli import main as eval_main
        sys.argv = [f"sdv2 {cmd}", *argv]
        return eval_main()   # checks its command line itself (it is also `python -m sdv2_lab.eval`)
    check_command_line(f"sdv2 {cmd}", CONFIGS[cmd], argv)
    sys.argv = [f"sdv2 {cmd}", *argv]
    COMMANDS[cmd]()


if __name__ == "__main__":
    main()
