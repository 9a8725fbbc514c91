"""Command line: ``sdv2 <command> [hydra overrides]``.

    sdv2 run                                   # the embedded default: tiny model, CPU, a generated clip
    sdv2 run backbone=wan_1_3b weights=real device=cuda input=file input.video=in.mp4 input.prompt="..."
    sdv2 eval -m steps=1,2,3,4 vae=wan,taehv   # the harness (Hydra multirun sweep)

Every option lives in ``conf/``; an unknown choice is an error listing the valid ones (Hydra's).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from .build import CONF_DIR  # noqa: E402

log = logging.getLogger("sdv2")


def read_prompt(cfg: DictConfig) -> str:
    prompt = cfg.input.get("prompt")
    pfile = cfg.input.get("prompt_file")
    if pfile:
        path = Path(pfile)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"prompt file {path} is empty")
        prompt = lines[0]  # as the reference: the first line
    if not prompt or not str(prompt).strip():
        raise ValueError("no prompt: set input.prompt=... or input.prompt_file=...")
    return str(prompt)


def input_frames(cfg: DictConfig):
    """(frames or an iterator of frames [3, t, H, W] in [-1, 1], input fps, description)."""
    if cfg.t2v:
        return None, float(cfg.fps), "text-to-video"
    if cfg.input.kind == "synthetic":
        from .io.synthetic import synthetic_clip
        video, _ = synthetic_clip(cfg.input.frames, cfg.height, cfg.width, seed=cfg.seed)
        return video, float(cfg.input.fps), f"synthetic clip ({cfg.input.frames} frames)"
    from .io.video import iter_video_frames, probe_video
    info = probe_video(cfg.input.video)
    frames = iter_video_frames(cfg.input.video, height=cfg.height, width=cfg.width,
                               max_frames=cfg.input.get("max_frames"), batch=4)
    return frames, info.fps, f"{cfg.input.video} ({info.frames} frames at {info.fps:.1f} fps)"


def run(cfg: DictConfig) -> dict:
    """Stream the input through the pipeline, write the mp4, print the timings."""
    import torch
    from tqdm import tqdm

    from .build import build_pipeline
    from .stream.driver import stream_clip
    from .io.video import VideoWriter

    prompt = read_prompt(cfg)
    out_dir = Path(cfg.output.dir)
    out_path = out_dir / cfg.output.name
    frames, in_fps, desc = input_frames(cfg)  # input errors surface before any model is built
    pipe = build_pipeline(cfg)
    dummy = pipe.weights_are_dummy
    print(f"sdv2 run: {cfg.backbone.name} / vae {cfg.vae.name} / {cfg.parallel.mode} / {cfg.steps} step(s) / {cfg.height}x{cfg.width} on {pipe.device} ({str(pipe.dtype).replace('torch.', '')}); input: {desc}")
    if dummy:
        print("NOTE: DUMMY weights (random init): the output video is noise. Timings are real. "
              "Use weights=real with the official files for real results (README).")
    with VideoWriter(out_path, fps=cfg.fps) as writer, tqdm(desc="frames", unit="f", disable=None) as bar:
        if cfg.t2v:
            pipe.start(prompt)
            out = pipe.generate(cfg.num_frames)
            writer.write(out)
            stats = {"output_frames": out.shape[0]}
        else:
            _, stats = stream_clip(pipe, frames, prompt, input_fps=in_fps, on_frames=writer.write, progress=bar,
                                   keep_output=False)
    stats.update(weights="dummy" if dummy else "real", output=str(out_path), device=str(pipe.device),
                 torch=torch.__version__, gpu=torch.cuda.get_device_name() if pipe.device.type == "cuda" else "cpu")
    print(format_stats(stats))
    (out_dir / "timings.json").write_text(json.dumps(stats, indent=1, default=str))
    return stats


def format_stats(s: dict) -> str:
    def f(key, fmt="{:.2f}", unit=""):
        v = s.get(key)
        return "n/a" if v is None else fmt.format(v) + unit
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
    run(cfg)


COMMANDS = {"run": _run_main}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = "run"
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        cmd = argv.pop(0)
    if cmd in ("eval",):
        from .eval.cli import main as eval_main
        sys.argv = [f"sdv2 {cmd}", *argv]
        return eval_main()
    if cmd not in COMMANDS:
        raise SystemExit(f"sdv2: unknown command {cmd!r}; commands: {sorted(COMMANDS) + ['eval']}")
    sys.argv = [f"sdv2 {cmd}", *argv]
    COMMANDS[cmd]()


if __name__ == "__main__":
    main()
