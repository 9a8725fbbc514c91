"""End-to-end streaming speed of the whole engine (encode -> noise -> DiT -> decode), dummy weights.

    python experiments/bench_pipeline.py --configs wan_1_3b:1,wan_1_3b:4 --streams 1,2,4,8 --overlap both
    python experiments/bench_pipeline.py --device cpu --configs tiny:2 --height 64 --width 96 --frames 25 \
        --extra vae=wan_tiny

Each row streams ``streams`` synthetic clips at once through one engine (their chunks share one DiT call per
step) and reports, per stream and in total: end-to-end and steady-state FPS, TTFF, per-chunk latency p50/p95,
stage FPS (CUDA events on the stage's own stream), peak memory; and the DiT stage's speed inside the engine
against the same DiT step timed alone (``bench_dit.bench_one``: same executor, no VAE) in the same process.
One warm-up stream per configuration is run first and discarded (cuDNN autotuning, CUDA-graph capture).
"""
import argparse
import json
import math

import torch

from bench_dit import bench_one
from sdv2_lab.build import backbone_config, build_pipeline, compose_config
from sdv2_lab.flops import mfu, peak_bf16_tflops
from sdv2_lab.settings import compile_kernels, frame_flops
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clips
import bench_dit


def fmt(v, spec=".1f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="wan_1_3b:1,wan_1_3b:2,wan_1_3b:4", help="backbone[:steps],... (no steps: the backbone's recipe's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=129, help="frames per clip")
    p.add_argument("--streams", default="1", help="streams at once, e.g. 1,2,4,8")
    p.add_argument("--overlap", default="on", choices=["on", "off", "both"])
    p.add_argument("--graph", default="on", choices=["on", "off"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT's elementwise chains (default: auto, as the front ends: on for CUDA "
                        "with Triton)")
    p.add_argument("--vae", default="wan")
    p.add_argument("--dit-alone", action="store_true", help="also time the DiT step alone (same process)")
    p.add_argument("--extra", default="", help="more Hydra overrides, comma separated")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    cuda = a.device.startswith("cuda")
    rows = []
    print("| model | steps | VAE | streams | overlap | e2e FPS / stream | total e2e FPS | steady FPS / stream | "
          "TTFF s (compute) | latency p50/p95 ms | enc / DiT / dec FPS | DiT alone FPS | peak GiB | MFU / DiT MFU | "
          "FLOP ceiling FPS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    overlaps = {"on": [True], "off": [False], "both": [False, True]}[a.overlap]
    for item in a.configs.split(","):
        backbone, _, asked = item.partition(":")
        for streams in map(int, a.streams.split(",")):
            for overlap in overlaps:
                ov = [f"backbone={backbone}", *([f"steps={asked}"] if asked else []), f"device={a.device}",
                      f"height={a.height}", f"width={a.width}", f"vae={a.vae}",
                      f"cuda_graph={'true' if a.graph == 'on' else 'false'}",
                      f"compile_kernels={'auto' if a.compile is None else str(a.compile).lower()}",
                      f"streams={streams}",
                      f"overlap={'true' if overlap else 'false'}"]
                ov += [x for x in a.extra.split(",") if x]
                cfg = compose_config("config", ov)
                steps = int(cfg.steps)
                pipe = build_pipeline(cfg)
                clips = [synthetic_clip(a.frames, a.height, a.width, seed=i)[0].to(pipe.device) for i in range(streams)]
                prompts = [f"a watercolor street {i}" for i in range(streams)]
                pc = pipe.cfg   # enough chunks to fill the KV cache: every graph captured
                warm = pc.first_chunk_frames + pc.chunk_frames * (pc.num_kv_cache // pc.frames_per_block + steps + 4)
                stream_clips(pipe, [c[:, :warm] for c in clips], prompts, seeds=list(range(streams)))  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                r = stream_clips(pipe, clips, prompts, seeds=list(range(streams)))
                per, tot = r.per_stream, r.total
                mean = lambda k: sum(float("nan") if s.get(k) is None else s[k] for s in per) / len(per)  # noqa: E731
                asked_vae = [x.split("=", 1)[1] for x in ov if x.startswith("vae=")][-1]   # the group, not the module
                row = dict(model=backbone, steps=int(steps), vae=asked_vae, vae_module=cfg.vae.name,
                           streams=streams, overlap=overlap,
                           e2e_fps_per_stream=mean("e2e_fps"), total_e2e_fps=tot.get("e2e_fps"),
                           steady_fps_per_stream=mean("steady_fps"), total_steady_fps=tot.get("steady_fps"),
                           ttff_s=mean("ttff_s"), ttff_compute_s=mean("ttff_compute_s"),
                           latency_p50_ms=max(s.get("latency_p50_ms", float("nan")) for s in per),
                           latency_p95_ms=max(s.get("latency_p95_ms", float("nan")) for s in per),
                           encode_fps=tot.get("encode_fps"), dit_fps=tot.get("dit_fps"),
                           decode_fps=tot.get("decode_fps"),
                           peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                           weights="dummy", gpu=torch.cuda.get_device_name() if cuda else "cpu",
                           torch=torch.__version__, per_stream=per, total=tot)
                # MFU: the recipe's analytic FLOPs per frame (its forwards per latent frame, attended frames)
                flops = frame_flops(cfg)
                peak = peak_bf16_tflops(row["gpu"])[0] if cuda else None
                row.update(flops.as_dict(), forwards_per_latent_frame=pc.forwards_per_latent_frame,
                           attended_frames=pc.attended_frames,
                           ceiling_fps=peak * 1e12 / flops.total if peak else None,   # at 100 % MFU
                           mfu=mfu(flops, tot["steady_fps"], peak * 1e12) if peak and tot.get("steady_fps") else None,
                           dit_mfu=mfu(flops.dit, tot["dit_fps"], peak * 1e12) if peak and tot.get("dit_fps") else None)
                del pipe, clips, r
                if cuda:
                    torch.cuda.empty_cache()
                if a.dit_alone:
                    bench_dit.clock = bench_dit.Clock(a.device)
                    alone = bench_one(backbone_config(cfg), int(steps), a.height, a.width, torch.device(a.device),
                                      torch.bfloat16 if cuda else torch.float32, 3, 12, cfg.num_kv_cache,
                                      cfg.sink_frames, cfg.adapt_sink_threshold, a.graph == "on" and cuda,
                                      compile_kernels(cfg), streams, kv_dtype=str(cfg.kv_cache_dtype))
                    row["dit_alone_fps"] = alone["dit_fps"]
                rows.append(row)
                print(f"| {backbone} | {steps} | {row['vae']} | {streams} | {'on' if overlap else 'off'} | "
                      f"{fmt(row['e2e_fps_per_stream'])} | {fmt(row['total_e2e_fps'])} | "
                      f"{fmt(row['steady_fps_per_stream'])} | {fmt(row['ttff_s'], '.3f')} "
                      f"({fmt(row['ttff_compute_s'], '.3f')}) | {fmt(row['latency_p50_ms'], '.0f')}/"
                      f"{fmt(row['latency_p95_ms'], '.0f')} | {fmt(row['encode_fps'])} / {fmt(row['dit_fps'])} / "
                      f"{fmt(row['decode_fps'])} | {fmt(row.get('dit_alone_fps'))} | {fmt(row['peak_gib'], '.1f')} | "
                      f"{pct(row['mfu'])} / {pct(row['dit_mfu'])} | {fmt(row['ceiling_fps'])} |",
                      flush=True)
                if a.json:  # written after every row: a crash keeps what was measured
                    json.dump(rows, open(a.json, "w"), indent=1, default=str)
    print("weights: DUMMY (random); timings are real")


if __name__ == "__main__":
    main()
