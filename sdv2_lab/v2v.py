"""The reference's command-line interface (``run_v2v.sh`` / ``streamdiffusionv2-single``) over ``sdv2 run``.

    ./run_v2v.sh single --video_path in.mp4 --prompt_file_path prompt.txt --output_folder outputs --step 2
    ./run_v2v.sh single --checkpoint_folder ckpts/wan_causal_dmd_v2v --vae lightvae   # lightvaew2_1 from ckpts/
    OUTPUT_FOLDER=out STEP=1 ./run_v2v.sh single-wo --checkpoint_folder ckpts/wan_causal_dmd_v2v

Writes ``<output_folder>/output_000.mp4`` as the reference does, and nothing else there (the timings are
printed). Every flag also reads its environment variable; extra ``key=value`` arguments are Hydra overrides of
``conf/``. The model arguments go through ``seed_config.seed_overrides``, the same mapping as the Python API.
Paths are the caller's (relative to the working directory). Errors name the flag that was typed.

Device: ``--device`` (cpu, cuda, cuda:k; ``--gpu_id k`` = cuda:k), default a GPU when there is one. On a GPU the
seed's defaults apply (480x832); on a CPU, unless ``--height``/``--width`` are given, the run is made at
240x416 (a quarter of the pixels), and says so.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

MODES = {"single": "single", "batch": "single", "single-wo": "single-wo", "wo": "single-wo",
         "wo-batch": "single-wo", "pipe": "pipe", "parallel": "pipe"}
CPU_SIZE = (240, 416)    # height, width on a CPU when none is given (the seed's 480x832 at half the side)
SEED_SIZE = (480, 832)

# flag -> (environment variable, default, type)
FLAGS = {
    "config_path": ("CONFIG_PATH", None, str), "checkpoint_folder": ("CHECKPOINT_FOLDER", None, str),
    "video_path": ("VIDEO_PATH", None, str), "prompt_file_path": ("PROMPT_FILE_PATH", None, str),
    "output_folder": ("OUTPUT_FOLDER", "outputs", str), "height": ("HEIGHT", None, int), "width": ("WIDTH", None, int),
    "fps": ("FPS", "16", int), "step": ("STEP", None, int), "noise_scale": ("NOISE_SCALE", None, float),
    "seed": ("SEED", "0", int), "model_type": ("MODEL_TYPE", "T2V-1.3B", str),
    "model": ("SDV2_MODEL", None, str),   # a conf/backbone entry (self_forcing, longlive, ...): docs/backbones.md
    "num_frames": ("NUM_FRAMES", "81", int), "target_fps": ("TARGET_FPS", None, float),
    "gpu_id": ("GPU_ID", None, int), "device": ("DEVICE", None, str), "wan_folder": ("SDV2_WAN_ROOT", None, str),
    "taehv": ("SDV2_TAEHV", None, str), "vae": ("SDV2_VAE", None, str),
    "lightvae": ("SDV2_LIGHTVAE", None, str), "lighttae": ("SDV2_LIGHTTAE", None, str),
    "num_gpus": ("NPROC_PER_NODE", None, int), "gpu_ids": ("GPU_IDS", None, str),   # pipe mode
}
SWITCHES = {"use_taehv": "USE_TAEHV", "use_tensorrt": "USE_TENSORRT", "fast": "FAST", "profile": "PROFILE",
            "t2v": "T2V", "fixed_noise_scale": "FIXED_NOISE_SCALE", "schedule_block": "SCHEDULE_BLOCK"}
# Hydra key (as our messages name it) -> the flag a run_v2v.sh user typed. Keys that are also English words
# ("steps", "seed", "device", "fps") are translated only where written as a setting (key=value).
KEY_TO_FLAG = {"input.prompt_file": "--prompt_file_path", "input.prompt": "--prompt_file_path",
               "input.video": "--video_path", "input.frames": "--video_path",
               "weights.checkpoint": "--checkpoint_folder",
               "weights.wan_folder": "--wan_folder", "weights.taehv": "--taehv", "output.dir": "--output_folder",
               "weights.lightvae": "--lightvae", "weights.lighttae": "--lighttae",
               "noise_scale": "--noise_scale", "target_fps": "--target_fps", "input.fps": "--fps",
               "config_path": "--config_path", "checkpoint_folder": "--checkpoint_folder", "wan_folder": "--wan_folder",
               "model_type": "--model_type", "height": "--height", "width": "--width"}
SETTING_TO_FLAG = {"steps": "--step", "seed": "--seed", "device": "--device", "fps": "--fps",
                   "num_frames": "--num_frames"}


def parse(argv):
    p = argparse.ArgumentParser(prog="run_v2v.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES), help="single | single-wo | pipe (and the reference's aliases)")
    from .seed_config import VAES
    for flag, (env, default, kind) in FLAGS.items():
        extra = {"choices": sorted(VAES)} if flag == "vae" else {}
        p.add_argument(f"--{flag}", type=kind, default=os.environ.get(env, default), help=f"(env {env})", **extra)
    for flag, env in SWITCHES.items():
        p.add_argument(f"--{flag}", action="store_true", default=os.environ.get(env, "0") not in ("0", "", "false"),
                       help=f"(env {env})")
    p.add_argument("--use_taehv_tensorrt", dest="use_tensorrt", action="store_true")
    p.add_argument("--max_outstanding", type=int, default=1, help="pipe mode (accepted for compatibility)")
    a, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (extra Hydra overrides are key=value)")
    a.overrides = rest
    return a


# The seed repository's own files, used when a flag is not given and the file is where the seed keeps it (paths
# relative to the working directory, as the seed's run_v2v.sh reads them); 14B has its own checkpoint and YAML.
SEED_FILES = {"checkpoint_folder": ("ckpts/wan_causal_dmd_v2v", "ckpts/wan_causal_dmd_v2v_14b"),
              "config_path": ("configs/wan_causal_dmd_v2v.yaml", "configs/wan_causal_dmd_v2v_14b.yaml"),
              "video_path": ("examples/original.mp4",) * 2, "prompt_file_path": ("examples/prompt.txt",) * 2}


def seed_defaults(a) -> list[str]:
    """Fill the flags that were not given with the seed's files that exist here; returns what was used."""
    used = []
    for flag, paths in SEED_FILES.items():
        path = Path(paths[a.model_type == "T2V-14B"])
        if getattr(a, flag) is None and not (flag == "video_path" and a.t2v) and \
                (path.is_dir() if flag == "checkpoint_folder" else path.is_file()):
            setattr(a, flag, str(path))
            used.append(f"--{flag} {path}")
    return used


def device_of(a) -> str:
    if a.gpu_id is not None:
        return f"cuda:{a.gpu_id}"
    if a.device:
        return a.device
    from .seed_config import default_device
    return default_device()


def size_of(a, device: str) -> tuple[int, int, bool]:
    """(height, width, chosen for the CPU): the seed's 480x832 unless on a CPU with neither size given."""
    if a.height is None and a.width is None and not device.startswith("cuda"):
        return CPU_SIZE[0], CPU_SIZE[1], True
    return (SEED_SIZE[0] if a.height is None else a.height), (SEED_SIZE[1] if a.width is None else a.width), False


def caller_path(path: str) -> str:
    """A path as the caller meant it: relative to the working directory they ran the command from."""
    return str(Path(path).expanduser().absolute())


def to_overrides(a) -> list[str]:
    """The overrides of a parsed command line (model arguments through ``seed_overrides``)."""
    from .seed_config import quote, seed_overrides
    mode = MODES[a.mode]
    device = device_of(a)
    height, width, _ = size_of(a, device)
    noise_scale = a.noise_scale if a.noise_scale is not None else (0.7 if mode == "single-wo" else 0.8)
    ov = seed_overrides(
        checkpoint_folder=caller_path(a.checkpoint_folder) if a.checkpoint_folder else None,
        mode="single" if mode == "pipe" else mode,
        model_type=a.model_type, model=a.model, step=a.step, height=height, width=width, fps=a.fps, seed=a.seed,
        noise_scale=noise_scale, device=device, use_taehv=a.use_taehv, use_tensorrt=a.use_tensorrt, fast=a.fast,
        config_path=caller_path(a.config_path) if a.config_path else None,
        wan_folder=caller_path(a.wan_folder) if a.wan_folder else None,
        taehv=caller_path(a.taehv) if a.taehv else None, vae=a.vae,
        lightvae=caller_path(a.lightvae) if a.lightvae else None,
        lighttae=caller_path(a.lighttae) if a.lighttae else None)
    ov += [f"output.dir={quote(caller_path(a.output_folder))}", "output.name=output_000.mp4", "output.timings=null"]
    if a.t2v:
        ov += ["t2v=true", f"num_frames={a.num_frames}"]
    elif a.video_path:
        ov += ["input=file", f"input.video={quote(caller_path(a.video_path))}", f"input.fps={a.fps}"]
    if a.prompt_file_path:
        ov.append(f"input.prompt_file={quote(caller_path(a.prompt_file_path))}")
    if a.fixed_noise_scale:
        ov.append("fixed_noise=true")
    if a.target_fps:
        ov.append(f"target_fps={a.target_fps}")
    if mode == "pipe":  # the DiT's blocks over --num_gpus GPUs (or --gpu_ids), one process each
        ov = [o for o in ov if not o.startswith("mode=")] + ["mode=pipe"]
        ids = [int(i) for i in str(a.gpu_ids).split(",") if i.strip()] if a.gpu_ids else []
        if ids and a.num_gpus and a.num_gpus != len(ids):
            raise SystemExit(f"run_v2v.sh pipe: --num_gpus {a.num_gpus} but --gpu_ids {a.gpu_ids} names {len(ids)}")
        ov.append(f"num_gpus={len(ids) or a.num_gpus or 2}")
        if ids:
            ov.append(f"mode.gpu_ids=[{','.join(map(str, ids))}]")
        if a.schedule_block:
            ov.append("mode.schedule_block=true")
    return ov + list(a.overrides)


def name_flags(message: str) -> str:
    """A message of ours in the words of this command line: Hydra keys become the flags that set them
    (``steps='two'`` -> ``--step 'two'``, ``input.prompt_file`` -> ``--prompt_file_path``)."""
    def alternatives(keys):
        return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    bare = re.compile(r"(?<![\w.-])(" + alternatives(KEY_TO_FLAG) + r")(?![\w])(=)?")
    setting = re.compile(r"(?<![\w.-])(" + alternatives(SETTING_TO_FLAG) + r")=")
    message = bare.sub(lambda m: KEY_TO_FLAG[m.group(1)] + (" " if m.group(2) else ""), message)
    return setting.sub(lambda m: SETTING_TO_FLAG[m.group(1)] + " ", message)


def announce(a, cfg) -> None:
    """Say the choices the user did not make explicitly: the device and, on a CPU, the size."""
    device = str(cfg.device)
    _, _, for_cpu = size_of(a, device)
    chosen = a.device is None and a.gpu_id is None
    print(f"run_v2v.sh: {a.mode} on {device}" + (" (no GPU found; --device chooses)" if chosen and
                                                  not device.startswith("cuda") else ""))
    if for_cpu:
        print(f"run_v2v.sh: on a CPU the seed's {SEED_SIZE[0]}x{SEED_SIZE[1]} takes about 4x as long as "
              f"{cfg.height}x{cfg.width}: running at {cfg.height}x{cfg.width} "
              f"(give --height {SEED_SIZE[0]} --width {SEED_SIZE[1]} for the seed's size)")


def check_prompt(a) -> None:
    """A prompt is needed (the first line of --prompt_file_path), unless an override gives one."""
    if not a.prompt_file_path and not any(o.split("=", 1)[0].lstrip("+") in ("input.prompt", "input.prompt_file")
                                          for o in a.overrides):
        if a.video_path or a.t2v:
            raise ValueError("no prompt: give --prompt_file_path <a text file whose first line is the prompt> "
                             "(or PROMPT_FILE_PATH=...)")


def main(argv=None):
    from .entry import guard
    guard("run_v2v.sh", _main, argv)


def _main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from .entry import offline_defaults, run_task
    offline_defaults()
    run_task("run_v2v.sh", _run, a, say=name_flags)


def _run(a) -> None:
    from .cli import run_checked
    from .configs import compose_config
    found = seed_defaults(a)
    if found:
        print(f"run_v2v.sh: the seed's files found here: {', '.join(found)}")
    check_prompt(a)
    cfg = compose_config("config", to_overrides(a))
    announce(a, cfg)
    run_checked(cfg, name="run_v2v.sh",
                dummy_hint="--checkpoint_folder ckpts/wan_causal_dmd_v2v (a folder with model.pt) loads the official files")


if __name__ == "__main__":
    main()
