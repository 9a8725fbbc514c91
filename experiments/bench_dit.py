"""Time one streaming DiT step (stream batch = steps) with dummy weights; print DiT FPS and MFU.

    python experiments/bench_dit.py                      # GPU: 1.3B and 14B, 480x832, 1-4 steps
    python experiments/bench_dit.py --device cpu --sizes tiny --height 64 --width 96 --iters 3   # smoke run

One call = one DiT forward over ``steps`` rows with a full KV cache (N=6 latent frames, 3 sinks, adaptive
refresh at 0.2, as the reference's default config); each call finishes one latent frame = 4 video frames,
so DiT FPS = 4 / step time. MFU = analytic FLOPs of the call (anchors.md §4.5) / time / measured bf16 peak.
Weights are DUMMY (random): speed does not depend on their values, outputs are meaningless.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sdv2_lab import build
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.cuda_graph import CUDAGraphStep
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.eval.flops import dit_flops_per_latent_frame, measure_peak_tflops  # the one FLOP model


def backbone_config(name: str, attention: str) -> WanDiTConfig:
    """conf/backbone/<name>.yaml with attention backend ``attention``, as every entry point reads it."""
    return build.backbone_config(build.compose_config("config", [f"backbone={name}", f"attention={attention}"]))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_one(cfg, steps, height, width, device, dtype, warmup, iters, num_kv, sink, threshold, graph, compiled=False):
    model = load_backbone(cfg, "dummy", device=device, dtype=dtype)
    if compiled:
        model.use_compiled_kernels(True)
    cache = model.new_cache(1, height, width, num_kv, sink, threshold, total_steps=steps, max_batch_size=steps)
    S = cache.spec.frame_tokens
    model.set_prompt(cache, torch.randn(1, 512, cfg.text_dim, device=device, dtype=dtype))
    lat = (height // 8, width // 8)
    t_first = torch.full((1, 2), 700, device=device)
    with torch.no_grad():
        for _ in range(steps):  # prepare: the first chunk, every step
            model(torch.randn(1, 2, 16, *lat, device=device, dtype=dtype), t_first, cache, [0])
        cache.expand_batch(steps)
        runner = CUDAGraphStep(model, cache) if graph else (lambda x, t, s: model(x, t, cache, s))
        starts = [2 * S] * steps
        t = torch.tensor([700, 500, 400, 200][:steps], device=device)[:, None]
        x = torch.randn(steps, 1, 16, *lat, device=device, dtype=dtype)
        chunk = 1
        timings = []
        total = num_kv + steps + warmup + iters
        for i in range(total):
            chunk += 1
            starts = [chunk * S] + starts[:-1]
            if i == total - iters:
                sync(device)
            if device.type == "cuda":
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
                runner(x, t, starts)
                ev1.record()
                if i >= total - iters:
                    timings.append((ev0, ev1))
            else:
                t0 = time.perf_counter()
                runner(x, t, starts)
                if i >= total - iters:
                    timings.append(time.perf_counter() - t0)
        sync(device)
    if device.type == "cuda":
        ms = [a.elapsed_time(b) for a, b in timings]
        mem = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        ms = [1e3 * s for s in timings]
        mem = float("nan")
    ms.sort()
    med = ms[len(ms) // 2]
    flops = steps * dit_flops_per_latent_frame(cfg, S, num_kv * S)
    del model, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(model=cfg.name, steps=steps, height=height, width=width, attention=cfg.attention, cuda_graph=graph,
                compiled_kernels=compiled,
                step_ms=round(med, 3), dit_fps=round(4e3 / med, 2), tflops_achieved=round(flops / med / 1e9, 1),
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
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
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
    print("| model | steps | CUDA graph | compiled | step ms | DiT FPS | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in a.sizes.split(","):
        cfg = backbone_config(name, a.attention)
        for steps in map(int, a.steps.split(",")):
            for graph, comp in [(g, c) for g in graphs for c in compiles]:
                r = bench_one(cfg, steps, a.height, a.width, device, dtype, a.warmup, a.iters, a.num_kv, a.sink,
                              a.threshold, graph, comp)
                r.update(gpu=gpu, torch=torch.__version__, peak_tflops=round(peak, 1),
                         mfu=round(r["tflops_achieved"] / peak, 4))
                rows.append(r)
                print(f"| {name} | {steps} | {'on' if graph else 'off'} | {'on' if comp else 'off'} | {r['step_ms']:.2f} | {r['dit_fps']:.1f} | "
                      f"{r['tflops_achieved']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gib']} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
