"""Steady-state streaming VAE speed at 480x832 (dummy weights): ours (eager, compiled, CUDA graph, fused,
fused + CUDA graph) vs the reference module, same run; the fused path's error against eager; TAEHV both ways.

    python experiments/bench_vae.py [--height 480 --width 832 --dim 96 --chunks 12 --warmup 3] [--check]
    python experiments/bench_vae.py --device cpu --height 64 --width 96 --dim 16 --chunks 3 --warmup 1 --check

Encode: the first chunk (5 frames) then 4-frame chunks, one latent each; decode: 2 latents then 1 per chunk
(4 frames). FPS = frames / time per chunk (median, CUDA events). "setup s" = wall time of the first chunk
plus the warm-up chunks (kernel JIT, cuDNN autotuning, graph capture, compilation: whatever the mode needs;
shapes autotuned by an earlier row are cached, so the first row of a kind pays most). "1st steady s" = the
first steady-state encode + decode (what a user's second chunk waits for). Weights are DUMMY (random):
speed only; the latent error of TAEHV's encoder against the Wan encoder measures plumbing, not quality.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

from sdv2_lab.vae import build_vae
from sdv2_lab.vae.accel import accelerate_vae
from sdv2_lab.vae.wan_fused import install_fused
from sdv2_lab.vae.wan_vae import load_wan_vae

T0 = time.time()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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


def wall(fn, dev):
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


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


def stream_timings(vae, a, dev, inputs, encode=True, decode=True):
    """(encode s, decode s, setup s, first steady s) of one VAE streaming the bench inputs."""
    x5, x4, z2, z1 = inputs
    es, ds = vae.new_state(), vae.new_state()
    t = time.perf_counter()
    if encode:
        vae.encode(es, x5)
    if decode:
        vae.decode(ds, z2)
    first = wall(lambda: (encode and vae.encode(es, x4), decode and vae.decode(ds, z1)), dev)
    for _ in range(a.warmup):
        if encode:
            vae.encode(es, x4)
        if decode:
            vae.decode(ds, z1)
    sync(dev)
    setup = time.perf_counter() - t
    enc = timed(lambda: vae.encode(es, x4), dev, a.chunks) if encode else None
    dec = timed(lambda: vae.decode(ds, z1), dev, a.chunks) if decode else None
    return enc, dec, setup, first


def bench_wan(name, opts, a, dev, dt, inputs):
    """opts: conf/vae/wan.yaml options; ``fused`` a dict of ``FusedWan`` options (the fused path) or absent."""
    opts = dict(opts)
    fused = opts.pop("fused", None)
    if fused is None:
        vae = build_vae({"name": "wan", "dim": a.dim, "fused": False, **opts}, dummy=True, device=dev, dtype=dt)
    else:
        accelerate = opts.pop("accelerate", "none")
        vae = load_wan_vae(dummy=True, dim=a.dim, device=dev, dtype=dt, **opts)
        vae = accelerate_vae(install_fused(vae, **fused), accelerate)
    return (name, *stream_timings(vae, a, dev, inputs)) + (steps_status(vae),)


def steps_status(vae):
    """'' or why an accelerated step fell back to eager."""
    bad = [f"{n}: {s.fallback_reason}" for n, s in vae._steps.items() if getattr(s, "fallback_reason", None)]
    return "; ".join(bad)


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
            timed(lambda: decode(z1t), dev, a.chunks), None, None, "")


def bench_taehv(name, opts, a, dev, dt, inputs):
    """TAEHV decode (encoder=wan: only the decoder is TAEHV's) or TAEHV both ways (encoder=taehv)."""
    from sdv2_lab.vae.taehv import TAEHVVAE, load_taehv
    taehv_dt = getattr(torch, opts.get("taehv_dtype") or a.dtype)
    vae = accelerate_vae(TAEHVVAE(load_taehv(None, dummy=True, device=dev, dtype=taehv_dt)),
                         opts.get("accelerate", "none"))
    enc, dec, setup, first = stream_timings(vae, a, dev, inputs, encode=opts.get("encode", False))
    return (name, enc, dec, setup, first, steps_status(vae))


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
    return (name, None, timed(lambda: ref.decode_video(window, parallel=parallel)[:, -4:], dev, a.chunks), None, None, "")


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
    return ("reference WanVAE_", enc, dec, None, None, "")


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def check_fused(a, dev, dt, chunks=5):
    """The fused path (+ CUDA graph on CUDA) against the eager module on the same dummy weights, chunk by
    chunk (first chunk, first steady chunk eager, capture, replays): in the run's dtype, relative L2 error and
    max |diff|, and both against the eager module in float32 (TF32 off): the fused path's error should be of
    the size of eager's own rounding error; and the fused path in float32 against eager float32 (tight)."""
    torch.manual_seed(0)
    mode = "cuda_graph" if dev.type == "cuda" else "none"
    eager = load_wan_vae(dummy=True, dim=a.dim, device=dev, dtype=dt)
    ref32 = copy.deepcopy(eager).float()
    fast = accelerate_vae(install_fused(copy.deepcopy(eager)), mode)
    fast32 = accelerate_vae(install_fused(copy.deepcopy(ref32)), mode)
    g = torch.Generator(device="cpu").manual_seed(1)
    video = (torch.rand(1, 3, 1 + 4 * (chunks - 1), a.height, a.width, generator=g) * 2 - 1).to(dev)
    lat = torch.randn(1, chunks + 1, 16, a.height // 8, a.width // 8, generator=g).to(dev)
    vchunks = [video[:, :, :5]] + [video[:, :, 1 + 4 * c:5 + 4 * c] for c in range(1, chunks - 1)]
    zchunks = [lat[:, :2]] + [lat[:, c + 1:c + 2] for c in range(1, chunks)]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    res = {}
    try:
        for call, xs in (("encode", vchunks), ("decode", zchunks)):
            st = [m.new_state() for m in (eager, fast, ref32, fast32)]
            r = dict(fused_vs_eager_rel=0.0, fused_vs_eager_max_abs=0.0, fused_vs_fp32_rel=0.0, eager_vs_fp32_rel=0.0,
                     fused_fp32_vs_eager_fp32_rel=0.0)
            walls = []  # the default path from cold: JIT + cuDNN autotuning, eager, capture, replays
            for x in xs:
                ye = getattr(eager, call)(st[0], x.to(dt))
                xd = x.to(dt)
                sync(dev)
                t = time.perf_counter()
                yf = getattr(fast, call)(st[1], xd)
                sync(dev)
                walls.append(round(time.perf_counter() - t, 4))
                yr, yf32 = getattr(ref32, call)(st[2], x.float()), getattr(fast32, call)(st[3], x.float())
                for k, v in (("fused_vs_eager_rel", rel(yf, ye)), ("fused_vs_fp32_rel", rel(yf, yr)),
                             ("eager_vs_fp32_rel", rel(ye, yr)), ("fused_fp32_vs_eager_fp32_rel", rel(yf32, yr)),
                             ("fused_vs_eager_max_abs", (yf.float() - ye.float()).abs().max().item())):
                    r[k] = max(r[k], v) if v == v else float("nan")  # NaN never passes
            res[call] = dict(r, fused_chunk_wall_s=walls)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    res["fallbacks"] = steps_status(fast) + steps_status(fast32)
    res["accelerated_calls"] = {n: getattr(s, "accelerated_calls", None) for n, s in fast._steps.items()}
    return res


def check_concurrent(a, dev, dt, inputs, iters=10):
    """Encode and decode of one fused + CUDA-graph VAE on two CUDA streams at once (as the stream engine
    will run them: encode chunk k+1 while decoding chunk k-1), every graph captured on a non-default stream:
    outputs must equal one stream's sequential results. Also times enc + dec per chunk both ways."""
    x5, x4, z2, z1 = inputs
    torch.manual_seed(0)
    vae = accelerate_vae(install_fused(load_wan_vae(dummy=True, dim=a.dim, device=dev, dtype=dt)), "cuda_graph")
    g = torch.Generator(device="cpu").manual_seed(2)
    xs = [x5] + [(torch.rand(x4.shape, generator=g) * 2 - 1).to(dev, dt) for _ in range(5)]
    zs = [z2] + [torch.randn(z1.shape, generator=g).to(dev, dt) for _ in range(5)]
    cur, s1, s2 = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    seq = vae.new_state()
    want = [(vae.encode(seq, x), vae.decode(seq, z)) for x, z in zip(xs, zs)]
    par = vae.new_state()
    s1.wait_stream(cur); s2.wait_stream(cur)
    got = []
    for x, z in zip(xs, zs):
        with torch.cuda.stream(s1):
            e = vae.encode(par, x)
        with torch.cuda.stream(s2):
            d = vae.decode(par, z)
        got.append((e, d))
    cur.wait_stream(s1); cur.wait_stream(s2)
    diff = max(max((w[i].float() - g_[i].float()).abs().max().item() for i in (0, 1)) for w, g_ in zip(want, got))

    def one_stream():
        for _ in range(iters):
            vae.encode(seq, x4); vae.decode(seq, z1)

    def two_streams():
        s1.wait_stream(torch.cuda.current_stream()); s2.wait_stream(torch.cuda.current_stream())
        for _ in range(iters):
            with torch.cuda.stream(s1):
                vae.encode(par, x4)
            with torch.cuda.stream(s2):
                vae.decode(par, z1)
        torch.cuda.current_stream().wait_stream(s1); torch.cuda.current_stream().wait_stream(s2)

    one, two = timed(one_stream, dev, 3) / iters, timed(two_streams, dev, 3) / iters
    return dict(max_abs_diff_two_streams_vs_one=diff, graphs_captured={n: s.captures for n, s in vae._steps.items()},
                fallbacks=steps_status(vae), enc_plus_dec_ms_one_stream=1e3 * one, enc_plus_dec_ms_two_streams=1e3 * two)


def micro(a, dev, dt):
    """Single-op timings at the decoder's top level (96 ch, 4 frames, 480x832): the fused norm (Triton vs
    the eager ops vs torch.compile of the same formula), a device copy for the bandwidth ceiling, and the
    conv variants the fused path chooses between."""
    import math
    import torch.nn.functional as F
    from sdv2_lab.vae import fused_ops
    H, W = a.height, a.width
    cl3, cl2 = torch.channels_last_3d, torch.channels_last
    out = {}
    x = torch.randn(1, 96, 4, H, W, device=dev, dtype=dt).contiguous(memory_format=cl3)
    r = torch.randn_like(x)
    gamma = torch.rand(96, 1, 1, 1, device=dev, dtype=dt) + 0.5
    buf = torch.empty(1, 96, 6, H, W, device=dev, dtype=dt, memory_format=cl3)
    s = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    ms = lambda fn: 1e3 * timed(fn, dev, 20)  # noqa: E731
    t = ms(lambda: x.clone())
    out["copy_ms"], out["copy_GBps"] = t, 2 * nbytes / t / 1e6
    t = ms(lambda: fused_ops.rms_norm_silu(x, gamma, out=buf[:, :, 2:]))
    out["triton_norm_silu_ms"], out["triton_norm_silu_GBps"] = t, 2 * nbytes / t / 1e6
    t = ms(lambda: fused_ops.rms_norm_silu(x, gamma, add=r, out=buf[:, :, 2:], sum_out=s))
    out["triton_add_norm_silu_ms"], out["triton_add_norm_silu_GBps"] = t, 4 * nbytes / t / 1e6
    out["eager_norm_silu_ms"] = ms(lambda: F.silu(F.normalize(x, dim=1) * math.sqrt(96) * gamma))
    out["eager_add_norm_silu_ms"] = ms(lambda: F.silu(F.normalize(x + r, dim=1) * math.sqrt(96) * gamma))

    def formula(x, r, gamma, out, s):
        v = x.float() + r.float()
        s.copy_(v)
        y = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * (gamma.float() * math.sqrt(96))
        out.copy_(F.silu(y))
    try:
        t0 = time.time()
        comp = torch.compile(formula, dynamic=False)
        comp(x, r, gamma, buf[:, :, 2:], s)
        out["compile_add_norm_silu_compile_s"] = time.time() - t0
        out["compile_add_norm_silu_ms"] = ms(lambda: comp(x, r, gamma, buf[:, :, 2:], s))
    except Exception as exc:  # noqa: BLE001
        out["compile_add_norm_silu_ms"] = f"failed: {type(exc).__name__}: {exc}"[:200]
    # encoder conv1 (3 -> 96) and decoder head (96 -> 3): channels-last with 3 vs 8 (zero-padded) channels
    for name, ci, co in (("enc_conv1", 3, 96), ("dec_head", 96, 3)):
        for c_in, c_out in ((ci, co), (max(ci, 8), max(co, 8))):
            inp = torch.randn(1, c_in, 6, H, W, device=dev, dtype=dt)
            w = torch.randn(c_out, c_in, 3, 3, 3, device=dev, dtype=dt)
            out[f"{name}_{c_in}to{c_out}_ncdhw_ms"] = ms(lambda: F.conv3d(inp, w, padding=(0, 1, 1)))
            inp, w = inp.contiguous(memory_format=cl3), w.contiguous(memory_format=cl3)
            out[f"{name}_{c_in}to{c_out}_cl_ms"] = ms(lambda: F.conv3d(inp, w, padding=(0, 1, 1)))
    # decoder's last upsampler: nearest x2 + conv 192 -> 96 vs the sub-pixel conv (192 -> 4 x 96) + interleave
    from sdv2_lab.vae.wan_fused import subpixel_weights
    f = torch.randn(4, 192, H // 2, W // 2, device=dev, dtype=dt).contiguous(memory_format=cl2)
    conv = torch.nn.Conv2d(192, 96, 3, padding=1).to(dev, dt).to(memory_format=cl2)
    ws, bs = subpixel_weights(conv.weight, conv.bias)
    out["upsample_then_conv_ms"] = ms(lambda: conv(F.interpolate(f, scale_factor=2.0, mode="nearest-exact")))
    y = F.conv2d(f, ws, bs, padding=1)
    o = torch.empty(4, 96, H, W, device=dev, dtype=dt, memory_format=cl2)
    out["subpixel_conv_ms"] = ms(lambda: F.conv2d(f, ws, bs, padding=1))
    out["subpixel_interleave_ms"] = ms(lambda: o.unflatten(2, (H // 2, 2)).unflatten(4, (W // 2, 2)).copy_(
        y.unflatten(1, (2, 2, 96)).permute(0, 3, 4, 1, 5, 2)))
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


KERNEL_KINDS = (("fused norm (Triton)", ("_rms_silu_kernel",)),
                ("attention", ("flash", "fmha", "attention", "sdpa")),
                ("conv (cuDNN)", ("conv", "xmma", "cudnn", "fprop", "implicit", "gemm", "sm90_", "sm80_", "cutlass")),
                ("copies / adds / pads", ("copy", "elementwise", "cat", "pad", "add", "fill", "upsample", "index")))


def profile_fused(a, dev, dt, inputs, calls=3):
    """Device time per steady-state chunk of the fused path (no graph, so kernels are visible), by kind of
    kernel: how far the convolutions are from their floor and how much glue is left around them."""
    from torch.profiler import ProfilerActivity, profile
    x5, x4, z2, z1 = inputs
    vae = install_fused(load_wan_vae(dummy=True, dim=a.dim, device=dev, dtype=dt))
    st = vae.new_state()
    vae.encode(st, x5); vae.decode(st, z2)
    for _ in range(2):
        vae.encode(st, x4); vae.decode(st, z1)
    out = {}
    for name, fn in (("encode", lambda: vae.encode(st, x4)), ("decode", lambda: vae.decode(st, z1))):
        sync(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync(dev)
        kinds = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            t = getattr(e, "self_cuda_time_total", 0) if t is None else t
            if not t or "CUDA" not in str(getattr(e, "device_type", "")):
                continue
            key = e.key.lower()
            kind = next((k for k, words in KERNEL_KINDS if any(w in key for w in words)), "other")
            ms, n = kinds.get(kind, (0.0, 0))
            kinds[kind] = (ms + t / 1e3 / calls, n + e.count // calls)
        out[name] = {k: dict(ms=round(v[0], 2), kernels=v[1]) for k, v in sorted(kinds.items())}
        out[name]["total_ms"] = round(sum(v[0] for v in kinds.values()), 2)
    return out


def taehv_latent_error(a, dev, dt, inputs):
    """TAEHV's encoder against the Wan encoder on the same frames (DUMMY weights on both: plumbing only)."""
    x5, x4 = inputs[:2]
    wan = build_vae({"name": "wan", "dim": a.dim}, dummy=True, device=dev, dtype=dt)
    tae = build_vae({"name": "taehv", "encoder": "taehv"}, dummy=True, device=dev, dtype=dt)
    sw, st = wan.new_state(), tae.new_state()
    zw = torch.cat([wan.encode(sw, x5), wan.encode(sw, x4)], 1)
    zt = torch.cat([tae.encode(st, x5), tae.encode(st, x4)], 1)
    return dict(latent_shapes=[list(zw.shape), list(zt.shape)], rel_l2_taehv_vs_wan=rel(zt, zw),
                note="DUMMY weights: this checks shapes / frame alignment (plumbing), not quality")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--chunks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--check", action="store_true", help="first: the fused path's error against eager (and, on "
                   "CUDA, encode / decode on two CUDA streams at once against one stream)")
    p.add_argument("--micro", action="store_true", help="single-op timings (fused norm, conv variants)")
    p.add_argument("--profile", action="store_true", help="device time of the fused path by kind of kernel")
    p.add_argument("--deadline", type=float, default=0, help="skip rows that would start after this many "
                   "seconds since start (0: none); for one-call GPU budgets")
    p.add_argument("--json", default=None, help="also write the rows and checks here")
    p.add_argument("--variants", default="wan_fused_graph,wan_fused,wan_fused_graph_noup,wan,wan_graph,ref_wan,"
                   "taehv,taehv_graph,taehv_full_graph,ref_taehv,ref_taehv_parallel,taehv_latent_error,wan_compile",
                   help="comma list of rows to measure")
    a = p.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    torch.backends.cudnn.benchmark = True
    H, W = a.height, a.width
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = tuple(t.to(dev, dt) for t in (torch.rand(1, 3, 5, H, W, generator=g) * 2 - 1,
                                           torch.rand(1, 3, 4, H, W, generator=g) * 2 - 1,
                                           torch.randn(1, 2, 16, H // 8, W // 8, generator=g),
                                           torch.randn(1, 1, 16, H // 8, W // 8, generator=g)))
    report = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "res": f"{H}x{W}", "dtype": a.dtype, "rows": [], "weights": "DUMMY"}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)

    with torch.no_grad():
        sections = [("check", "fused vs eager check", a.check, lambda: check_fused(a, dev, dt)),
                    ("concurrency", "two CUDA streams", a.check and dev.type == "cuda",
                     lambda: check_concurrent(a, dev, dt, inputs)),
                    ("profile", "fused path by kernel kind", a.profile and dev.type == "cuda",
                     lambda: profile_fused(a, dev, dt, inputs)),
                    ("micro", "single ops", a.micro, lambda: micro(a, dev, dt))]
        for key, title, wanted, fn in sections:
            if not wanted:
                continue
            try:
                report[key] = fn()
            except Exception as exc:  # noqa: BLE001 -- a failing section must not cost the table
                import traceback
                traceback.print_exc()
                report[key] = f"FAILED: {type(exc).__name__}: {exc}"
            print(f"{title}:", json.dumps(report[key]), f"[{time.time() - T0:.0f} s]", flush=True)
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        fused_opts = lambda **o: {"fused": o}  # noqa: E731
        variants = {
            "wan": lambda: bench_wan("sdv2_lab WanVAE eager", {}, a, dev, dt, inputs),
            "wan_cl": lambda: bench_wan("sdv2_lab WanVAE eager channels_last_3d", {"channels_last": True}, a, dev, dt, inputs),
            "wan_compile": lambda: bench_wan("sdv2_lab WanVAE torch.compile", {"accelerate": "compile"}, a, dev, dt, inputs),
            "wan_graph": lambda: bench_wan("sdv2_lab WanVAE CUDA graph (eager layout)", {"accelerate": "cuda_graph"},
                                           a, dev, dt, inputs),
            "wan_fused": lambda: bench_wan("sdv2_lab WanVAE fused", fused_opts(), a, dev, dt, inputs),
            "wan_fused_graph": lambda: bench_wan("sdv2_lab WanVAE fused + CUDA graph (default)",
                                                 {**fused_opts(), "accelerate": "cuda_graph"}, a, dev, dt, inputs),
            "wan_fused_graph_noup": lambda: bench_wan("sdv2_lab WanVAE fused + CUDA graph, upsample not fused",
                                                      {**fused_opts(fuse_upsample=False), "accelerate": "cuda_graph"},
                                                      a, dev, dt, inputs),
            "wan_fused_graph_nopad": lambda: bench_wan("sdv2_lab WanVAE fused + CUDA graph, RGB convs not padded",
                                                       {**fused_opts(pad_rgb=False), "accelerate": "cuda_graph"},
                                                       a, dev, dt, inputs),
            "wan_fused_graph_torchnorm": lambda: bench_wan("sdv2_lab WanVAE fused + CUDA graph, norm as torch ops",
                                                           {**fused_opts(norm_impl="torch"), "accelerate": "cuda_graph"},
                                                           a, dev, dt, inputs),
            "wan_fused_graph_bias": lambda: bench_wan("sdv2_lab WanVAE fused + CUDA graph, conv biases not deferred",
                                                      {**fused_opts(defer_bias=False), "accelerate": "cuda_graph"},
                                                      a, dev, dt, inputs),
            "ref_wan": lambda: bench_reference_wan(a, dev, dt, inputs),
            "diffusers_wan": lambda: bench_diffusers_wan(a, dev, dt, inputs),
            "taehv": lambda: bench_taehv(f"sdv2_lab TAEHV decode (stateful, {a.dtype})", {}, a, dev, dt, inputs),
            "taehv_fp16": lambda: bench_taehv("sdv2_lab TAEHV decode (stateful, float16)", {"taehv_dtype": "float16"},
                                              a, dev, dt, inputs),
            "taehv_graph": lambda: bench_taehv(f"sdv2_lab TAEHV decode (stateful, CUDA graph, {a.dtype})",
                                               {"accelerate": "cuda_graph"}, a, dev, dt, inputs),
            "taehv_full_graph": lambda: bench_taehv(f"sdv2_lab TAEHV both ways (CUDA graph, {a.dtype})",
                                                    {"accelerate": "cuda_graph", "encode": True}, a, dev, dt, inputs),
            "ref_taehv": lambda: bench_reference_taehv("reference TAEHV (4-latent window, sequential)", False,
                                                       a, dev, dt, inputs),
            "ref_taehv_parallel": lambda: bench_reference_taehv("reference TAEHV (4-latent window, parallel)", True,
                                                                a, dev, dt, inputs),
        }
        for v in a.variants.split(","):
            if v not in variants and v != "taehv_latent_error":
                raise SystemExit(f"unknown variant {v!r}; valid: {sorted(variants) + ['taehv_latent_error']}")
            if a.deadline and time.time() - T0 > a.deadline:
                print(f"({v} skipped: past the --deadline of {a.deadline:.0f} s)", flush=True)
                continue
            try:
                if v == "taehv_latent_error":
                    report["taehv_latent_error"] = taehv_latent_error(a, dev, dt, inputs)
                    print("TAEHV encoder vs Wan encoder:", json.dumps(report["taehv_latent_error"]), flush=True)
                    r = None
                else:
                    r = variants[v]()
            except Exception as exc:  # one failing row must not lose the others
                print(f"({v} failed: {type(exc).__name__}: {exc})", flush=True)
                r = None
            if r is not None:
                report["rows"].append(dict(zip(("name", "enc_s", "dec_s", "setup_s", "first_steady_s", "fallback"), r)))
                print("  measured", row_md(r), f"[{time.time() - T0:.0f} s]", flush=True)
                save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(f"# {report['gpu']}, torch {torch.__version__}, {H}x{W}, {a.dtype}, cudnn.benchmark on, DUMMY weights")
    print("| VAE | encode ms/chunk | encode FPS | decode ms/chunk | decode FPS | setup s | 1st steady s |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(row_md(tuple(r.values())))
    save()


def row_md(r):
    name, enc, dec, setup, first, fallback = r
    e = f"{1e3 * enc:.1f} | {4 / enc:.1f}" if enc is not None else "- | -"
    d = f"{1e3 * dec:.1f} | {4 / dec:.1f}" if dec is not None else "- | -"
    s = f"{setup:.2f} | {first:.2f}" if setup is not None else "- | -"
    return f"| {name}{' (FELL BACK: ' + fallback + ')' if fallback else ''} | {e} | {d} | {s} |"


if __name__ == "__main__":
    main()
