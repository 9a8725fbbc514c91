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

import hydra
from omegaconf import DictConfig

from .configs import CONF_DIR
from .entry import check_command_line, guard, offline_defaults, run_task
from .inputs import damage_reported_here, expected_output_frames, input_frames, read_prompt
from .report import format_pipe, format_stats

log = logging.getLogger("sdv2")


def run_checked(cfg: DictConfig, **kwargs) -> dict:
    """``run`` for the command lines: an input cut short ends in its error (exit 1) after the frames before the
    cut were streamed and written."""
    with damage_reported_here() as damage:
        try:
            stats = run(cfg, **kwargs)
        except ValueError as exc:
            if not damage:
                raise
            raise ValueError(f"{damage[0]}; nothing was written ({exc})") from None
    if damage:
        raise ValueError(f"{damage[0]}; {stats.get('output')} holds the {stats.get('output_frames')} "
                         f"frames made before it")
    return stats


def run(cfg: DictConfig, *, name: str = "sdv2 run",
        dummy_hint: str = "weights=real with the official files: README") -> dict:
    """Stream the input through the pipeline, write the mp4, print the timings. Everything that can be checked
    without the models (settings, weight files, input, output path) is checked first. ``mode=pipe`` on several
    stages: this same function runs on every rank (one process per stage, launched here), each building its
    stage and streaming the same input in lockstep; the last rank writes the video and prints the timings."""
    from .preflight import check_config
    check_config(cfg)   # before the models' modules are imported: a mistake is one line, at once

    import torch
    from tqdm import tqdm

    from .build import build_pipeline
    from .io.files import check_output_file
    from .io.threads import BackgroundWriter, prefetch
    from .io.video import VideoWriter
    from .parallel.launch import launches, on_ranks
    from .parallel.placement import writes_output
    from .stream.clips import stream_clip

    writer = writes_output()
    prompt = read_prompt(cfg)
    out_dir = Path(cfg.output.dir)
    out_path = check_output_file(out_dir / cfg.output.name, "output video") if writer else None
    frames, in_fps, desc, count = input_frames(cfg)
    if launches(cfg):   # one process per stage (sdv2_lab/parallel/launch.py), each running this function
        return on_ranks(cfg, run, name=name, dummy_hint=dummy_hint)[-1]
    say = (lambda line: print(f"{name}: {line}", flush=True)) if writer else None
    pipe = build_pipeline(cfg, announce=say, dummy_hint=dummy_hint)
    if not isinstance(frames, torch.Tensor) and frames is not None:  # decoded on a thread of its own, ahead of use
        pin = pipe.device.type == "cuda"
        frames = prefetch(frames, depth=8, prepare=(lambda t: t.pin_memory()) if pin else None)
    if not writer:   # a pipe stage before the last: in step with it, nothing to write
        return stream_clip(pipe, frames, prompt, input_fps=in_fps, keep_output=False)[1]
    say(f"input: {desc}")
    total = count if cfg.t2v else expected_output_frames(count, cfg)
    # the mp4 is encoded on a thread of its own: the loop that feeds the GPU never waits for the encoder
    with BackgroundWriter(VideoWriter(out_path, fps=cfg.fps)) as mp4, \
            tqdm(desc="output frames", total=total, unit="f", mininterval=1.0, dynamic_ncols=True) as bar:
        if cfg.t2v and pipe.cfg.mode != "pipe":
            pipe.start(prompt)
            out = pipe.generate(cfg.num_frames)
            mp4.write(out)
            bar.update(out.shape[0])
            stats = {"output_frames": out.shape[0]}
        else:
            _, stats = stream_clip(pipe, frames, prompt, input_fps=in_fps, on_frames=mp4.write, progress=bar,
                                   keep_output=False, host_frames="uint8")
    stats.update(weights="dummy" if pipe.weights_are_dummy else "real", output=str(out_path),
                 device=str(pipe.device), torch=torch.__version__,
                 gpu=torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else "cpu",
                 warmup_s=pipe.warmup_s, writer_waits=mp4.waits)
    if stats.get("pipe_ranks"):
        stats["device"] = f"{stats['pipe_ranks']} x {pipe.device.type}"
        if stats.get("encode_fps") is None:   # the last rank does not encode: rank 0's encode rate
            stats["encode_fps"] = stats.get("pipe_encode_fps")
    print(format_stats(stats))
    if stats.get("pipe_ranks"):
        print(format_pipe(stats))
    timings = cfg.output.get("timings", "timings.json")
    if timings:
        (out_dir / timings).write_text(json.dumps(stats, indent=1, default=str))
    return stats


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
