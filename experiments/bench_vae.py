"""Steady-state streaming VAE speed at 480x832 (dummy weights): ours vs the reference module, same run.

    python experiments/bench_vae.py [--height 480 --width 832 --dim 96 --chunks 12 --warmup 3]
    python experiments/bench_vae.py --device cpu --height 64 --width 96 --dim 16 --chunks 3 --warmup 1

Encode: the first chunk (5 frames) then 4-frame chunks, one latent each; decode: 2 latents then 1 per chunk
(4 frames). FPS = frames / time per chunk (CUDA events). Weights are DUMMY (random): speed only.
"""
import argparse
import os
import time

import torch

from sdv2_lab.vae import build_vae


def timed(fn, device, iters):
    """Median seconds of fn() over iters calls."""
    ts = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def reference_vae_class():
    """The reference's WanVAE_ from the installed wheel, loaded by file so that the wheel's package
    __init__ (which imports diffusers, transformers, ...) is not needed."""
    import importlib.util
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "wan", "wan_base", "modules", "vae.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("reference_wan_vae", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.WanVAE_


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-reference", action="store_true")
    a = p.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    torch.backends.cudnn.benchmark = True
    H, W = a.height, a.width
    x5 = torch.rand(1, 3, 5, H, W, device=dev, dtype=dt) * 2 - 1
    x4 = torch.rand(1, 3, 4, H, W, device=dev, dtype=dt) * 2 - 1
    z2 = torch.randn(1, 2, 16, H // 8, W // 8, device=dev, dtype=dt)
    z1 = torch.randn(1, 1, 16, H // 8, W // 8, device=dev, dtype=dt)
    rows = []
    with torch.no_grad():
        vae = build_vae({"name": "wan", "dim": a.dim}, dummy=True, device=dev, dtype=dt)
        es, ds = vae.new_state(), vae.new_state()
        vae.encode(es, x5); vae.decode(ds, z2)
        for _ in range(a.warmup):
            vae.encode(es, x4); vae.decode(ds, z1)
        enc = timed(lambda: vae.encode(es, x4), dev, a.chunks)
        dec = timed(lambda: vae.decode(ds, z1), dev, a.chunks)
        rows.append(("sdv2_lab WanVAE", enc, dec))
        del vae
        if not a.no_reference:
            WanVAE_ = reference_vae_class()
            if WanVAE_ is None:
                print("(reference wheel streamdiffusionv2==0.1.1 not installed: no reference row)")
            else:
                ref = WanVAE_(dim=a.dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                              temperal_downsample=[False, True, True], dropout=0.0).eval().to(dev, dt)
                scale = [torch.zeros(16, device=dev, dtype=dt), torch.ones(16, device=dev, dtype=dt)]
                ref.first_encode = ref.first_decode = True
                ref.stream_encode(x5.transpose(1, 2).transpose(1, 2), None)
                ref.stream_decode(z2.transpose(1, 2), scale)
                for _ in range(a.warmup):
                    ref.stream_encode(x4, None); ref.stream_decode(z1.transpose(1, 2), scale)
                enc = timed(lambda: ref.stream_encode(x4, None), dev, a.chunks)
                dec = timed(lambda: ref.stream_decode(z1.transpose(1, 2), scale), dev, a.chunks)
                rows.append(("reference WanVAE_", enc, dec))
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, {H}x{W}, {a.dtype}, cudnn.benchmark on, DUMMY weights")
    print("| VAE | encode ms/chunk | encode FPS | decode ms/chunk | decode FPS |")
    print("|---|---|---|---|---|")
    for name, enc, dec in rows:
        print(f"| {name} | {1e3 * enc:.1f} | {4 / enc:.1f} | {1e3 * dec:.1f} | {4 / dec:.1f} |")


if __name__ == "__main__":
    main()
