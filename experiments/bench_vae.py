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


def reference_taehv_class():
    """The reference's TAEHV module from the installed wheel (by file, as above)."""
    import importlib.util
    spec = importlib.util.find_spec("models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "wan", "taehv_wrapper.py")
    if not os.path.exists(path):
        return None
    # Only the self-contained TAEHV part is needed: drop the wrapper's imports of the wheel's other modules
    # (they pull diffusers etc., absent on the GPU box); the TAEHV classes never use them.
    src = "\n".join(ln for ln in open(path).read().splitlines() if not ln.startswith("from models."))
    namespace = {"__name__": "reference_taehv", "__file__": path, "VAEInterface": torch.nn.Module, "WanVAEWrapper": object}
    exec(compile(src, path, "exec"), namespace)
    return namespace["TAEHV"]


def bench_wan(name, opts, a, dev, dt, inputs):
    x5, x4, z2, z1 = inputs
    vae = build_vae({"name": "wan", "dim": a.dim, **opts}, dummy=True, device=dev, dtype=dt)
    es, ds = vae.new_state(), vae.new_state()
    vae.encode(es, x5); vae.decode(ds, z2)
    for _ in range(a.warmup):
        vae.encode(es, x4); vae.decode(ds, z1)
    enc = timed(lambda: vae.encode(es, x4), dev, a.chunks)
    dec = timed(lambda: vae.decode(ds, z1), dev, a.chunks)
    return (name, enc, dec)


def bench_diffusers_wan(a, dev, dt, inputs):
    """diffusers' AutoencoderKLWan streamed through its private per-call caches (the only way it streams:
    its public encode/decode clear the caches on every call), to decide whether to build on it."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        print(f"(diffusers not importable: {exc})")
        return None
    x5, x4, z2, z1 = inputs
    vae = AutoencoderKLWan(base_dim=a.dim).eval().to(dev, dt)
    vae.clear_cache()

    def encode(x):
        vae._enc_conv_idx = [0]
        return vae.quant_conv(vae.encoder(x, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))

    def decode(z, first=False):
        vae._conv_idx = [0]
        return vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                           first_chunk=first)

    encode(x5[:, :, :1]); encode(x5[:, :, 1:])
    z2t, z1t = z2.transpose(1, 2), z1.transpose(1, 2)
    decode(z2t[:, :, :1], first=True); decode(z2t[:, :, 1:])
    for _ in range(a.warmup):
        encode(x4); decode(z1t)
    return ("diffusers AutoencoderKLWan (private caches)", timed(lambda: encode(x4), dev, a.chunks),
            timed(lambda: decode(z1t), dev, a.chunks))


def bench_taehv(name, opts, a, dev, dt, inputs):
    _, _, z2, z1 = inputs
    from sdv2_lab.vae.taehv import TAEHVVAE, load_taehv
    from sdv2_lab.vae.accel import accelerate_vae
    taehv_dt = getattr(torch, opts.get("taehv_dtype") or a.dtype)
    vae = accelerate_vae(TAEHVVAE(load_taehv(None, dummy=True, device=dev, dtype=taehv_dt)),
                         opts.get("accelerate", "none"))
    ds = vae.new_state()
    vae.decode(ds, z2)
    for _ in range(a.warmup):
        vae.decode(ds, z1)
    return (name, None, timed(lambda: vae.decode(ds, z1), dev, a.chunks))


def bench_reference_taehv(name, parallel, a, dev, dt, inputs):
    """The reference's streaming decode: every chunk re-decodes a 4-latent window (3 of context)."""
    RefTAEHV = reference_taehv_class()
    if RefTAEHV is None:
        return None
    import tempfile
    from sdv2_lab.vae.taehv import TAEHV
    with tempfile.TemporaryDirectory() as d:
        torch.save(TAEHV().state_dict(), os.path.join(d, "taew2_1.pth"))
        ref = RefTAEHV(checkpoint_path=os.path.join(d, "taew2_1.pth")).eval().to(dev, dt)
    window = torch.cat([inputs[2], inputs[2]], 1)  # 4 latents
    for _ in range(a.warmup):
        ref.decode_video(window, parallel=parallel)
    return (name, None, timed(lambda: ref.decode_video(window, parallel=parallel)[:, -4:], dev, a.chunks))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default="wan,wan_cl,wan_compile,wan_graph,ref_wan,diffusers_wan,taehv,taehv_fp16,taehv_graph,"
                   "ref_taehv,ref_taehv_parallel",
                   help="comma list of rows to measure")
    a = p.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    torch.backends.cudnn.benchmark = True
    H, W = a.height, a.width
    inputs = (torch.rand(1, 3, 5, H, W, device=dev, dtype=dt) * 2 - 1,
              torch.rand(1, 3, 4, H, W, device=dev, dtype=dt) * 2 - 1,
              torch.randn(1, 2, 16, H // 8, W // 8, device=dev, dtype=dt),
              torch.randn(1, 1, 16, H // 8, W // 8, device=dev, dtype=dt))
    variants = {
        "wan": lambda: bench_wan("sdv2_lab WanVAE", {}, a, dev, dt, inputs),
        "wan_cl": lambda: bench_wan("sdv2_lab WanVAE channels_last_3d", {"channels_last": True}, a, dev, dt, inputs),
        "wan_compile": lambda: bench_wan("sdv2_lab WanVAE torch.compile", {"accelerate": "compile"}, a, dev, dt, inputs),
        "wan_graph": lambda: bench_wan("sdv2_lab WanVAE CUDA graph", {"accelerate": "cuda_graph"}, a, dev, dt, inputs),
        "ref_wan": lambda: bench_reference_wan(a, dev, dt, inputs),
        "diffusers_wan": lambda: bench_diffusers_wan(a, dev, dt, inputs),
        "taehv": lambda: bench_taehv(f"sdv2_lab TAEHV decode (stateful, {a.dtype})", {}, a, dev, dt, inputs),
        "taehv_fp16": lambda: bench_taehv("sdv2_lab TAEHV decode (stateful, float16)", {"taehv_dtype": "float16"},
                                          a, dev, dt, inputs),
        "taehv_graph": lambda: bench_taehv(f"sdv2_lab TAEHV decode (stateful, CUDA graph, {a.dtype})",
                                           {"accelerate": "cuda_graph"}, a, dev, dt, inputs),
        "ref_taehv": lambda: bench_reference_taehv("reference TAEHV (4-latent window, sequential)", False,
                                                   a, dev, dt, inputs),
        "ref_taehv_parallel": lambda: bench_reference_taehv("reference TAEHV (4-latent window, parallel)", True,
                                                            a, dev, dt, inputs),
    }
    rows = []
    with torch.no_grad():
        for v in a.variants.split(","):
            if v not in variants:
                raise SystemExit(f"unknown variant {v!r}; valid: {sorted(variants)}")
            try:
                r = variants[v]()
            except Exception as exc:  # one failing row must not lose the others
                print(f"({v} failed: {type(exc).__name__}: {exc})")
                r = None
            if r is not None:
                rows.append(r)
                print("  measured", r[0], flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, {H}x{W}, {a.dtype}, cudnn.benchmark on, DUMMY weights")
    print("| VAE | encode ms/chunk | encode FPS | decode ms/chunk | decode FPS |")
    print("|---|---|---|---|---|")
    for name, enc, dec in rows:
        e = f"{1e3 * enc:.1f} | {4 / enc:.1f}" if enc is not None else "- | -"
        print(f"| {name} | {e} | {1e3 * dec:.1f} | {4 / dec:.1f} |")


def bench_reference_wan(a, dev, dt, inputs):
    x5, x4, z2, z1 = inputs
    WanVAE_ = reference_vae_class()
    if WanVAE_ is None:
        print("(reference wheel streamdiffusionv2==0.1.1 not installed: no reference row)")
        return None
    ref = WanVAE_(dim=a.dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0).eval().to(dev, dt)
    scale = [torch.zeros(16, device=dev, dtype=dt), torch.ones(16, device=dev, dtype=dt)]
    ref.first_encode = ref.first_decode = True
    ref.stream_encode(x5, None)
    ref.stream_decode(z2.transpose(1, 2), scale)
    for _ in range(a.warmup):
        ref.stream_encode(x4, None); ref.stream_decode(z1.transpose(1, 2), scale)
    enc = timed(lambda: ref.stream_encode(x4, None), dev, a.chunks)
    dec = timed(lambda: ref.stream_decode(z1.transpose(1, 2), scale), dev, a.chunks)
    return ("reference WanVAE_", enc, dec)


if __name__ == "__main__":
    main()
