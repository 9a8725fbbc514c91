"""Time one streaming DiT step (stream batch = steps) with dummy weights; print DiT FPS and MFU.

    python experiments/bench_dit.py                      # GPU: 1.3B and 14B, 480x832, 1-4 steps
    python experiments/bench_dit.py --device cpu --sizes tiny --height 64 --width 96 --iters 3   # smoke run

One call = one stream-batch DiT job over ``steps`` x ``streams`` rows with a full KV cache (N=6 latent frames,
3 sinks, adaptive refresh at 0.2, as the reference's default config), run by the executor the pipeline uses
(plan, DiT, velocity -> x0, re-noising; a CUDA graph with --cuda-graph on); each call finishes one latent
frame = 4 video frames per stream, so DiT FPS = 4 x streams / step time. MFU = analytic FLOPs of the call
(sdv2_lab/flops.py) / time / measured bf16 peak.
Weights are DUMMY (random): speed does not depend on their values, outputs are meaningless.
"""
from __future__ import annotations

import argparse
import json

import torch

from sdv2_lab import build
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.flops import dit_flops_per_latent_frame, measure_peak_tflops  # the one FLOP model
from sdv2_lab.stream.executor import build_executor
from sdv2_lab.stream.scheduler import Scheduler
from sdv2_lab.stream.timing import Clock

clock = None


def backbone_config(name: str, attention: str) -> WanDiTConfig:
    """conf/backbone/<name>.yaml with attention backend ``attention``, as every entry point reads it."""
    return build.backbone_config(build.compose_config("config", [f"backbone={name}", f"attention={attention}"]))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_one(cfg, steps, height, width, device, dtype, warmup, iters, num_kv, sink, threshold, graph, compiled=False,
              streams=1, kv_dtype="model"):
    """Time the steady-state stream-batch DiT job of ``streams`` streams through an executor: the same code path
    (plan, DiT, velocity -> x0, re-noising, slot shift) as the pipeline's DiT stage."""
    model = load_backbone(cfg, "dummy", device=device, dtype=dtype)
    if compiled:
        model.use_compiled_kernels(True)
    cache = model.new_cache(streams * steps, height, width, num_kv, sink, threshold, kv_dtype=kv_dtype)
    executor = build_executor("cuda_graph" if graph else "eager", model, cache)
    scheduler = Scheduler("single", [700, 500, 400, 200][:steps], cache.spec, max_streams=streams)
    S = cache.spec.frame_tokens
    lat = (16, height // 8, width // 8)
    emb = torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype)
    t = torch.tensor([700, 500, 400, 200][:steps], device=device)
    timings = []
    with torch.no_grad():
        rows = []
        for _ in range(streams):  # each stream: its prompt, its first chunk (all steps), its rows filled
            s = scheduler.open("p")
            executor.set_prompt(s.rows, emb)
            (job,) = scheduler.dit_jobs([scheduler.noise_chunk(s)])
            executor.run(job, torch.randn(1, 2, *lat, device=device, dtype=dtype), t[:, None],
                         torch.randn(steps - 1, 1, 2, *lat, device=device, dtype=dtype) if steps > 1 else None)
            executor.copy_rows(s.rows[0], s.rows[1:])
            rows += s.rows
        ring = torch.randn(streams * steps, 1, *lat, device=device, dtype=dtype)
        tt, noise = t.repeat(streams), torch.randn_like(ring)
        total = num_kv + steps + warmup + iters
        for i in range(total):
            (job,) = scheduler.dit_jobs([scheduler.noise_chunk(s) for s in scheduler.streams.values()])
            a = clock.now()
            result = executor.run(job, ring, tt, noise)
            b = clock.now()
            ring = result.next_x
            if i >= total - iters:
                timings.append((a, b))
        sync(device)
    ms = sorted(1e3 * (clock.seconds(b) - clock.seconds(a)) for a, b in timings)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    med = ms[len(ms) // 2]
    flops = streams * steps * dit_flops_per_latent_frame(cfg, S, num_kv * S)
    del model, cache, executor
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(model=cfg.name, steps=steps, streams=streams, height=height, width=width, attention=cfg.attention,
                cuda_graph=graph, compiled_kernels=compiled, step_ms=round(med, 3),
                dit_fps=round(4e3 * streams / med, 2), tflops_achieved=round(flops / med / 1e9, 1),
                peak_mem_gib=round(mem, 2), weights="dummy")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="wan_1_3b,wan_14b")
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--cuda-graph", default="both", choices=["on", "off", "both"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--num-kv", type=int, default=6)
    p.add_argument("--sink", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--compile", default="off", choices=["on", "off", "both"],
                   help="torch.compile the blocks' elementwise chains")
    p.add_argument("--streams", default="1", help="streams batched into one DiT call, e.g. 1,2,4,8")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    global clock
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    clock = Clock(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    graphs = {"on": [True], "off": [False], "both": [False, True]}[a.cuda_graph]
    if device.type != "cuda":
        graphs = [False]
    peak = measure_peak_tflops(device, dtype if device.type == "cuda" else torch.float32,
                               n=8192 if device.type == "cuda" else 512, iters=20 if device.type == "cuda" else 3)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# device {gpu}, torch {torch.__version__}, measured matmul peak {peak:.0f} TFLOP/s ({a.dtype}); "
          f"WEIGHTS ARE DUMMY (random)")
    compiles = {"on": [True], "off": [False], "both": [False, True]}[a.compile]
    print("| model | steps | streams | CUDA graph | compiled | step ms | DiT FPS (all streams) | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in a.sizes.split(","):
        cfg = backbone_config(name, a.attention)
        for steps in map(int, a.steps.split(",")):
            for graph, comp, n_streams in [(g, c, k) for g in graphs for c in compiles
                                           for k in map(int, a.streams.split(","))]:
                r = bench_one(cfg, steps, a.height, a.width, device, dtype, a.warmup, a.iters, a.num_kv, a.sink,
                              a.threshold, graph, comp, n_streams)
                r.update(gpu=gpu, torch=torch.__version__, peak_tflops=round(peak, 1),
                         mfu=round(r["tflops_achieved"] / peak, 4))
                rows.append(r)
                print(f"| {name} | {steps} | {n_streams} | {'on' if graph else 'off'} | {'on' if comp else 'off'} | {r['step_ms']:.2f} | {r['dit_fps']:.1f} | "
                      f"{r['tflops_achieved']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gib']} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
