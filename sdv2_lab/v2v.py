"""The reference's command-line interface (``run_v2v.sh`` / ``streamdiffusionv2-single``), as a thin wrapper
over ``sdv2 run``: every flag (and its environment variable) becomes a Hydra override.

    ./run_v2v.sh single --video_path in.mp4 --prompt_file_path prompt.txt --output_folder outputs --step 2
    OUTPUT_FOLDER=out STEP=1 ./run_v2v.sh single-wo --profile

Writes ``<output_folder>/output_000.mp4`` as the reference does.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MODES = {"single": "single", "batch": "single", "single-wo": "single_wo", "wo": "single_wo",
         "wo-batch": "single_wo", "pipe": "pipe", "parallel": "pipe"}

# flag -> (environment variable, default)
FLAGS = {
    "config_path": ("CONFIG_PATH", None), "checkpoint_folder": ("CHECKPOINT_FOLDER", None),
    "video_path": ("VIDEO_PATH", None), "prompt_file_path": ("PROMPT_FILE_PATH", None),
    "output_folder": ("OUTPUT_FOLDER", "outputs"), "height": ("HEIGHT", 480), "width": ("WIDTH", 832),
    "fps": ("FPS", 16), "step": ("STEP", 2), "noise_scale": ("NOISE_SCALE", None), "seed": ("SEED", 0),
    "model_type": ("MODEL_TYPE", "T2V-1.3B"), "num_frames": ("NUM_FRAMES", 81), "target_fps": ("TARGET_FPS", None),
    "gpu_id": ("GPU_ID", None), "wan_folder": ("SDV2_WAN_ROOT", None),
}
SWITCHES = {"use_taehv": "USE_TAEHV", "use_tensorrt": "USE_TENSORRT", "fast": "FAST", "profile": "PROFILE",
            "t2v": "T2V", "fixed_noise_scale": "FIXED_NOISE_SCALE", "schedule_block": "SCHEDULE_BLOCK"}
YAML_KEYS = {"num_kv_cache": "num_kv_cache", "num_sink_tokens": "sink_frames",
             "adapt_sink_threshold": "adapt_sink_threshold", "num_frame_per_block": "frames_per_block"}


def parse(argv):
    p = argparse.ArgumentParser(prog="run_v2v.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES), help="single | single-wo | pipe (and the reference's aliases)")
    for flag, (env, default) in FLAGS.items():
        p.add_argument(f"--{flag}", default=os.environ.get(env, default), help=f"(env {env})")
    for flag, env in SWITCHES.items():
        p.add_argument(f"--{flag}", action="store_true", default=os.environ.get(env, "0") not in ("0", "", "false"))
    p.add_argument("--use_taehv_tensorrt", dest="use_tensorrt", action="store_true")
    p.add_argument("--max_outstanding", type=int, default=1, help="pipe mode (accepted for compatibility)")
    a, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (extra Hydra overrides are key=value)")
    a.overrides = rest
    return a


def to_overrides(a) -> list[str]:
    mode = MODES[a.mode]
    if mode == "pipe":
        raise SystemExit("run_v2v.sh pipe: pipe mode (DiT blocks split across GPUs) is not available in this "
                         "version; use single or single-wo")
    ov = [f"parallel={mode}", f"height={a.height}", f"width={a.width}", f"fps={a.fps}", f"steps={a.step}",
          f"seed={a.seed}", f"hydra.run.dir={a.output_folder}", "output.name=output_000.mp4"]
    if a.noise_scale is not None:
        ov.append(f"noise_scale={a.noise_scale}")
    elif mode == "single_wo":
        ov.append("noise_scale=0.7")  # the reference's single-wo default
    if a.model_type not in ("T2V-1.3B", "T2V-14B"):
        raise SystemExit(f"--model_type must be T2V-1.3B or T2V-14B, got {a.model_type}")
    if a.checkpoint_folder:
        size = "1.3B" if a.model_type == "T2V-1.3B" else "14B"
        ov += [f"backbone={'wan_1_3b' if size == '1.3B' else 'wan_14b'}", "weights=real",
               f"weights.checkpoint={a.checkpoint_folder}", "text_encoder=umt5_xxl"]
        ov.append(f"weights.wan_folder={a.wan_folder or f'wan_models/Wan2.1-T2V-{size}'}")
        ov.append("device=cuda" if a.gpu_id is None else f"device=cuda:{a.gpu_id}")
    taehv = a.use_taehv or a.use_tensorrt or a.fast
    if taehv or a.checkpoint_folder:  # one vae choice (Hydra refuses two values for a group)
        ov.append(("vae=taehv" if a.checkpoint_folder else "vae=taehv_tiny") if taehv else "vae=wan")
    if a.use_tensorrt or a.fast:  # no TensorRT here: the decoder's CUDA-graph replay plays its part
        ov.append("vae.accelerate=cuda_graph")
    if a.fast:
        ov += ["num_kv_cache=5", "sink_frames=2", "adapt_sink_threshold=-1", "cuda_graph=true"]
    if a.t2v:
        ov += ["t2v=true", f"num_frames={a.num_frames}"]
    elif a.video_path:
        ov += ["input=file", f"input.video={a.video_path}", f"input.fps={a.fps}"]
    if a.prompt_file_path:
        ov.append(f"input.prompt_file={a.prompt_file_path}")
    if a.fixed_noise_scale:
        ov.append("fixed_noise=true")
    if a.target_fps:
        ov.append(f"target_fps={a.target_fps}")
    if a.config_path:
        ov += yaml_overrides(a.config_path)
    return ov + list(a.overrides)


def yaml_overrides(path) -> list[str]:
    """The reference's YAML (e.g. wan_causal_dmd_v2v.yaml): the inference keys become overrides."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config_path {p} not found")
    data = yaml.safe_load(p.read_text()) or {}
    ov = [f"{ours}={data[theirs]}" for theirs, ours in YAML_KEYS.items() if theirs in data]
    if "denoising_step_list" in data:
        steps = [int(t) for t in data["denoising_step_list"] if int(t) != 0]
        ov.append(f"denoising_step_list=[{','.join(map(str, steps))}]")
    return ov


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    from .cli import main as cli_main
    cli_main(["run", *to_overrides(a)])


if __name__ == "__main__":
    main()
