"""Time to encode one prompt with the UMT5-XXL text encoder (dummy weights at the real size), on and off the GPU.

    python experiments/bench_text.py [--device cuda --dtype bfloat16 --prompts 5]
    python experiments/bench_text.py --device cpu --size tiny --dtype float32

Rows: a new prompt (median over distinct prompts, CUDA events), the same prompt again (prompt cache), and the
same two with ``offload=True`` (weights in pinned host memory, one block on the GPU at a time). Weights are
DUMMY: the embeddings are noise; the timings are real. The tokenizer is synthetic (no umt5-xxl folder here),
so token counts differ a little from the real SentencePiece vocabulary.
"""
import argparse
import time

import torch
from omegaconf import OmegaConf

from sdv2_lab.build import CONF_DIR
from sdv2_lab.text import TextEncoder, UMT5Size

PROMPTS = ["a watercolor painting of a cat on a windowsill, soft morning light",
           "cyberpunk city at night, neon reflections on wet streets, cinematic",
           "an oil painting of a stormy sea with a lighthouse, dramatic clouds",
           "a claymation figure waving at the camera in a cozy kitchen",
           "van gogh style portrait of a person talking, swirling brush strokes",
           "anime style, a girl riding a bicycle along the seaside, summer"]


def timed(fn, dev):
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        return a.elapsed_time(b) / 1e3
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", default="umt5_xxl", help="a conf/text_encoder name (umt5_xxl, tiny)")
    p.add_argument("--prompts", type=int, default=5)
    a = p.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    size = UMT5Size.from_mapping(OmegaConf.load(CONF_DIR / "text_encoder" / f"{a.size}.yaml"))
    print(f"# {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{a.size}, {a.dtype}, DUMMY weights, synthetic tokenizer")
    print("| text encoder | new prompt ms (median) | cached prompt ms | peak GPU GiB while encoding |")
    print("|---|---|---|---|")
    for offload in (False, True):
        enc = TextEncoder.from_config(size, dummy=True, device=dev, dtype=dt, offload=offload)
        enc.encode("warm-up prompt")  # cuBLAS / allocator warm-up, not counted
        if dev.type == "cuda":  # peak while encoding (dummy construction itself briefly holds the whole model)
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        prompts = (PROMPTS * ((a.prompts // len(PROMPTS)) + 1))[:a.prompts]
        new = sorted(timed(lambda q=f"{q} #{i}": enc.encode(q), dev) for i, q in enumerate(prompts))
        cached = timed(lambda: enc.encode(f"{prompts[0]} #0"), dev)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
        print(f"| UMT5 {a.size}{' offload' if offload else ''} | {1e3 * new[len(new) // 2]:.1f} | "
              f"{1e3 * cached:.2f} | {peak:.2f} |", flush=True)
        del enc


if __name__ == "__main__":
    main()
