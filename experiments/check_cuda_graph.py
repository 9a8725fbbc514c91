"""GPU check: a stream run through CUDAGraphStep equals the same stream run eagerly (same weights, inputs).

    python experiments/check_cuda_graph.py [--size wan_1_3b --steps 2 --chunks 16]
Prints the max relative error over every chunk and the number of graph captures/replays; exits 1 on mismatch.
"""
import argparse
import sys

import torch

from bench_dit import backbone_config
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.cuda_graph import CUDAGraphStep


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="wan_1_3b")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = load_backbone(backbone_config(a.size, "sdpa"), "dummy", device=dev, dtype=dt)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=dt)
    caches = []
    for _ in range(2):
        c = model.new_cache(1, a.height, a.width, 6, 3, 0.2, total_steps=a.steps, max_batch_size=a.steps)
        model.set_prompt(c, ctx)
        caches.append(c)
    S, lat = caches[0].spec.frame_tokens, (a.height // 8, a.width // 8)
    g = torch.Generator(device=dev).manual_seed(0)
    first = torch.randn(1, 2, 16, *lat, device=dev, dtype=dt, generator=g)
    with torch.no_grad():
        for c in caches:
            for k in range(a.steps):
                model(first, torch.full((1, 2), 700 - 100 * k, device=dev), c, [0])
            c.expand_batch(a.steps)
        graphed = CUDAGraphStep(model, caches[1])
        starts = [2 * S] * a.steps
        t = torch.tensor([700, 500, 400, 200][: a.steps], device=dev)[:, None]
        worst = 0.0
        for chunk in range(2, a.chunks + 2):
            starts = [chunk * S] + starts[:-1]
            x = torch.randn(a.steps, 1, 16, *lat, device=dev, dtype=dt, generator=g)
            ref = model(x, t, caches[0], starts)
            out = graphed(x, t, starts)
            worst = max(worst, ((out.float() - ref.float()).norm() / ref.float().norm()).item())
    same_queue = torch.equal(caches[0].queue, caches[1].queue)
    print(f"cuda-graph vs eager: max rel err {worst:.2e} over {a.chunks} chunks; captures {graphed.captures}, "
          f"replays {graphed.replays}; eviction queues equal: {same_queue}")
    sys.exit(0 if worst < 1e-2 and same_queue and graphed.replays > 0 else 1)


if __name__ == "__main__":
    main()
