"""Profile steady-state DiT steps on the GPU: top CUDA kernels by time and kernels per step.

    python experiments/profile_dit.py --size wan_1_3b --steps 1
"""
import argparse

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
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = load_backbone(backbone_config(a.size, "sdpa"), "dummy", device=dev, dtype=dt)
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
    print(ka.table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
