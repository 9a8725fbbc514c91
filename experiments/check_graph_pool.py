"""GPU check: a VAE step's CUDA graphs after every graph of its pool was dropped (a stream ended, a new one began).

Prints whether capturing into a pool handle whose graphs are all gone fails (the allocator frees the pool with its
last graph) and that ``CUDAGraphed`` takes a fresh pool then, so the second stream replays a graph.
    python3 experiments/check_graph_pool.py
"""
import torch

from sdv2_lab.vae.accel import CUDAGraphed
from sdv2_lab.vae.state import Batch, StreamCache


def fn(x, cache):
    return torch.nn.functional.conv3d(x, w, padding=1) * 2


def reuse_freed_handle() -> str:
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    x = torch.randn(1, 8, 2, 32, 32, device="cuda")
    with torch.cuda.stream(stream):   # cuDNN picks its kernels outside the capture, as CUDAGraphed's warm-up does
        fn(x, None)
    torch.cuda.synchronize()
    for i in range(2):
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=pool, stream=stream, capture_error_mode="thread_local"):
                fn(x, None)
        except RuntimeError as exc:
            return f"capture {i + 1} into the freed pool's handle failed: {str(exc)[:90]}"
        del g
    return "capturing into a freed pool's handle worked on this torch"


if __name__ == "__main__":
    w = torch.randn(8, 8, 3, 3, 3, device="cuda")
    print("raw torch:", reuse_freed_handle())
    step = CUDAGraphed(fn, "encode")
    x = torch.randn(1, 8, 2, 32, 32, device="cuda")
    for n in range(3):   # three streams one after another, each ending before the next
        c = StreamCache()
        outs = [step(x, Batch([c])) for _ in range(3)]
        ok = all(torch.allclose(o, fn(x, None)) for o in outs)
        print(f"stream {n}: captures {step.captures}, pools made {step.pools_made}, "
              f"accelerated calls {step.accelerated_calls}, equal to eager {ok}, fell back {step.fallback_reason}")
        step.forget({c.uid})
