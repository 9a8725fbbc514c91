"""End-to-end streaming speed of the whole pipeline (encode -> noise -> DiT -> decode), dummy weights.

    python experiments/bench_pipeline.py --configs wan_1_3b:1,wan_1_3b:2,wan_14b:1 [--frames 129]
    python experiments/bench_pipeline.py --device cpu --configs tiny:2 --height 64 --width 96 --frames 25 \
        --extra vae=wan_tiny

Each row streams a synthetic clip chunk by chunk (sdv2_lab.stream.driver.stream_clip) and reports the
design.md numbers: end-to-end and steady-state FPS, TTFF, per-chunk latency, stage FPS. One warm-up stream
per configuration is run first and discarded (cuDNN autotuning, CUDA-graph capture).
"""
import argparse
import json

import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.stream.driver import stream_clip
from sdv2_lab.io.synthetic import synthetic_clip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="wan_1_3b:1,wan_1_3b:2,wan_1_3b:4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--graph", default="on", choices=["on", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's elementwise chains")
    p.add_argument("--extra", default="", help="more Hydra overrides, comma separated")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    print("| model | steps | VAE | e2e FPS | steady FPS | TTFF s (compute) | latency p50/p95 ms | enc / DiT / dec FPS |")
    print("|---|---|---|---|---|---|---|---|")
    for item in a.configs.split(","):
        backbone, steps = item.split(":")
        ov = [f"backbone={backbone}", f"steps={steps}", f"device={a.device}", f"height={a.height}",
              f"width={a.width}", f"cuda_graph={'true' if a.graph == 'on' else 'false'}", "vae=wan",
              f"compile_kernels={'true' if a.compile else 'false'}"]
        ov += [x for x in a.extra.split(",") if x]
        cfg = compose_config("config", ov)
        pipe = build_pipeline(cfg)
        video, _ = synthetic_clip(a.frames, a.height, a.width)
        stream_clip(pipe, video[:, :21], "warm-up", keep_output=False)
        _, s = stream_clip(pipe, video, "a watercolor street", input_fps=16, keep_output=False)
        s.update(model=backbone, steps=int(steps), vae=cfg.vae.name, weights="dummy",
                 gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", torch=torch.__version__)
        rows.append(s)
        print(f"| {backbone} | {steps} | {cfg.vae.name} | {s['e2e_fps']:.1f} | {s['steady_fps']:.1f} | "
              f"{s['ttff_s']:.3f} ({s['ttff_compute_s']:.3f}) | {s['latency_p50_ms']:.0f}/{s['latency_p95_ms']:.0f} | "
              f"{s.get('encode_fps', float('nan')):.1f} / {s.get('dit_fps', float('nan')):.1f} / "
              f"{s.get('decode_fps', float('nan')):.1f} |", flush=True)
        del pipe
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("weights: DUMMY (random); timings are real")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
