"""Bad input frames on the GPU path (CUDA graphs, stages overlapped on CUDA streams): the input guard's error names
the chunk and frame, the next stream is clean (equal to the first clean one), clamp mode goes on, and what the
guard costs (steady FPS with input_guard=raise against off, same process, alternating). Writes
``experiments/results/check_faults_<gpu>.json``.

    python experiments/check_faults_gpu.py                       # 1.3B, 480x832, 1 step, Wan VAE
    python experiments/check_faults_gpu.py --device cpu --backbone tiny --vae wan_tiny --height 32 --width 48 \\
        --frames 25 --repeats 1                                  # CPU smoke run

Expected: "error" names chunk 3, frame 14; "next_stream_equal" true; "clamp_finite" true; the raise / off FPS
ratio within noise of 1.0 (no host sync per chunk: the records are read where a chunk is read anyway).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clips
from sdv2_lab.stream.input_guard import InputError


def run(pipe, clip, keep=True):
    return stream_clips(pipe, [clip], ["a dog walks on the grass, realistic"], seeds=[0], keep_output=keep)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="wan_1_3b")
    p.add_argument("--vae", default="wan")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--repeats", type=int, default=3, help="timed streams per guard mode (alternating)")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    base = [f"backbone={a.backbone}", f"vae={a.vae}", f"steps={a.steps}", f"height={a.height}", f"width={a.width}",
            f"device={a.device}"] + (["cuda_graph=true", "overlap=true"] if cuda else [])
    result: dict = {"config": base, "frames": a.frames}
    clip = synthetic_clip(a.frames, a.height, a.width)[0]
    bad = clip.clone()
    bad[:, 14] = float("nan")
    pipe = build_pipeline(compose_config("config", base))
    clip_d, bad_d = clip.to(pipe.device), bad.to(pipe.device)
    clean = run(pipe, clip_d).outputs[0]
    try:
        run(pipe, bad_d)
        result["error"] = None
    except InputError as exc:
        result["error"] = str(exc)
    again = run(pipe, clip_d).outputs[0]
    result["next_stream_equal"] = bool(torch.equal(clean, again))
    result["next_stream_finite"] = bool(torch.isfinite(again).all())
    fps = {"raise": [], "off": []}
    for _ in range(a.repeats):
        for mode in ("raise", "off"):
            pipe.driver.guard.mode = mode
            fps[mode].append(run(pipe, clip_d, keep=False).per_stream[0].get("steady_fps"))
    pipe.driver.guard.mode = "clamp"
    clamped = run(pipe, bad_d).outputs[0]
    result["clamp_finite"] = bool(torch.isfinite(clamped).all())
    pipe.close()
    mean = {k: sum(v) / len(v) for k, v in fps.items() if v and all(x == x for x in v)}
    result.update(steady_fps=fps, steady_fps_mean=mean,
                  raise_over_off=mean["raise"] / mean["off"] if len(mean) == 2 and mean["off"] else None)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    result["gpu"], result["torch"] = gpu, torch.__version__
    out = Path(a.out) / f"check_faults_{gpu.replace('NVIDIA ', '').split()[0].lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    ok = (result["error"] and "input chunk 3, frame 14" in result["error"] and result["next_stream_equal"]
          and result["clamp_finite"])
    print(f"{'OK' if ok else 'FAILED'}; wrote {out}")


if __name__ == "__main__":
    main()
