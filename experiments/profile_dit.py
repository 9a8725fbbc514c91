"""Profile steady-state DiT steps on the GPU: top CUDA kernels by time and kernels per step.

    python experiments/profile_dit.py --size wan_1_3b --steps 1 [--compiled] [--json F]

Kernels are launched eagerly here; their GPU time is what a CUDA-graph replay of the same step spends (a graph
removes the launch gaps, not kernel time), so the table says where a graphed step's time goes.
"""
import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench_dit import backbone_config
from sdv2_lab.backbones.checkpoints import load_backbone


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="wan_1_3b")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--compiled", action="store_true", help="the blocks' elementwise chains through torch.compile")
    p.add_argument("--json", default=None, help="also write {kernel: GPU us per step} here")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = load_backbone(backbone_config(a.size, "sdpa"), "dummy", device=dev, dtype=dt)
    if a.compiled:
        model.use_compiled_kernels(True)
    cache = model.new_cache(a.steps, 480, 832, 6, 3, 0.2)
    model.set_prompt(cache, torch.randn(1, 512, 4096, device=dev, dtype=dt))
    S = cache.spec.frame_tokens
    with torch.no_grad():
        for _ in range(a.steps):
            model(torch.randn(1, 2, 16, 60, 104, device=dev, dtype=dt), torch.full((1, 2), 700, device=dev), cache, [0])
        cache.expand_batch(a.steps)
        x = torch.randn(a.steps, 1, 16, 60, 104, device=dev, dtype=dt)
        t = torch.tensor([700, 500, 400, 200][: a.steps], device=dev)[:, None]
        starts, chunk = [2 * S] * a.steps, 1
        for _ in range(10):
            chunk += 1
            starts = [chunk * S] + starts[:-1]
            model(x, t, cache, starts)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(a.iters):
                chunk += 1
                starts = [chunk * S] + starts[:-1]
                model(x, t, cache, starts)
            torch.cuda.synchronize()
    ka = prof.key_averages()
    n_kernels = sum(e.count for e in ka if e.device_type.name == "CUDA")
    print(f"CUDA kernels per step: {n_kernels / a.iters:.0f}")
    kernels = {e.key: e.device_time_total / a.iters for e in ka if e.device_type.name == "CUDA"}
    total = sum(kernels.values())
    print(f"GPU kernel time per step: {total / 1e3:.2f} ms ({'compiled' if a.compiled else 'eager'} elementwise)")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:a.rows]:
        print(f"{us / 1e3:8.3f} ms {100 * us / total:5.1f}%  {name[:110]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "steps": a.steps, "compiled": a.compiled, "total_us": total,
                       "kernels_us": kernels}, f, indent=1)


if __name__ == "__main__":
    main()
