"""Where a streaming VAE's time goes, by kind of work, beside its convolutions' floor, in one call (dummy weights).

    python experiments/profile_vae.py --json vae_profile.json            # GPU: Wan VAE (96) and LightVAE (24)
    python experiments/profile_vae.py --device cpu --height 32 --width 48 --dims 16 --iters 1 --streams 1,2
                                                                         # CPU smoke run (CPU op times)
Sections, every number per steady-state chunk (4 frames <-> 1 latent) of the fused path:

* ``floor``: the convolution floor by the method of the conv-floor probe (``vae_conv_floor.py``): the Wan VAE's
  causal 3x3x3 convs at the level shapes of the stream, as conv3d (NCDHW), conv3d channels-last, conv2d over
  the three time taps stacked on channels, and three conv2d accumulated; ms, TFLOP/s, their error against a).
* ``convs``: every convolution one steady encode / decode makes (recorded as the fused path calls them), each
  timed alone as it is called and at its floor (the best variant that computes the same), summed.
* ``profile``: device time by kind of work (torch.profiler, kernels attributed to the op that launched them):
  conv (cuDNN kernels), the conv bias PyTorch adds after cuDNN, norm + SiLU (one fused pass), SiLU / norm
  as separate ops (eager), padding (zero fills), cache copies (the streams' history in and out), layout
  copies (interleaves, transposes), adds (residual sums, deferred biases), attention, other.
* ``steps``: ms per chunk of eager, fused, fused + CUDA graph, for 1 stream and N streams in one call.
* ``memory`` (CUDA): a stream's state (its history) and the peak memory each added stream costs a batched
  call (fused + CUDA graph), at the run's size: the issue's <= 2 GiB per added stream at 480x832.
* ``check``: three streams (one joining late) in one fused + CUDA-graph call per chunk, float32 with TF32 off,
  against each stream alone through the fused path without graphs: the largest relative error (<= 1e-5
  expected), graphs captured, fallbacks.
"""
import argparse
import contextlib
import copy
import json
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from sdv2_lab.vae import state as vae_state
from sdv2_lab.vae import wan_fused
from sdv2_lab.vae.accel import accelerate_vae
from sdv2_lab.vae.state import per_stream_bytes, state_nbytes
from sdv2_lab.vae.wan_fused import install_fused
from sdv2_lab.vae.wan_vae import AttentionBlock, load_wan_vae

CL3, CL2 = torch.channels_last_3d, torch.channels_last


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev, iters=20, warmup=3):
    """ms per call: warm-up calls, then ``iters`` calls between two CUDA events (the floor probe's method);
    wall time on a CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    if dev.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t) / iters


# ---------------------------------------------------------------------------------------------- the floor
def tap_variants(x: torch.Tensor, w: torch.Tensor, padding=(1, 1)):
    """The four ways to run a causal 3-tap x kh x kw conv over a padded input [B, C, 2 + T, H, W] (its first
    two frames the history): name -> fn; every fn returns [B, Co, T, H, W] in some layout."""
    b, c, tt, h, wd = x.shape
    t = tt - 2
    xcl, wcl = x.contiguous(memory_format=CL3), w.contiguous(memory_format=CL3)
    xc, wc = x.contiguous(), w.contiguous()
    frames = xcl.transpose(1, 2).reshape(b * tt, c, h, wd).contiguous(memory_format=CL2)   # [B*(2+T), C, H, W]
    taps = [w[:, :, k].contiguous(memory_format=CL2) for k in range(3)]
    stacked_w = torch.cat(taps, dim=1).contiguous(memory_format=CL2)

    def shifted(k):   # frames k .. k + T - 1 of every batch row, as one conv2d batch
        return frames.unflatten(0, (b, tt))[:, k:k + t].flatten(0, 1)

    def as5d(y):
        return y.unflatten(0, (b, t)).transpose(1, 2)

    return {"conv3d": lambda: F.conv3d(xc, wc, padding=(0, *padding)),
            "conv3d_cl": lambda: F.conv3d(xcl, wcl, padding=(0, *padding)),
            "stacked_conv2d": lambda: as5d(F.conv2d(torch.cat([shifted(k) for k in range(3)], 1), stacked_w,
                                                    padding=padding)),
            "three_conv2d": lambda: as5d(F.conv2d(shifted(0), taps[0], padding=padding)
                                         + F.conv2d(shifted(1), taps[1], padding=padding)
                                         + F.conv2d(shifted(2), taps[2], padding=padding))}


def floor_table(dev, dt, height, width, iters):
    """The probe's six level shapes, scaled to the stream's size: every variant's ms, the best's TFLOP/s."""
    s = lambda k: (height // k, width // k)  # noqa: E731
    shapes = [("dec L3 96ch full T4", 96, 96, 4, *s(1)), ("dec L2 192ch 1/2 T4", 192, 192, 4, *s(2)),
              ("dec L1 384ch 1/4 T2", 384, 384, 2, *s(4)), ("dec L0 384ch 1/8 T1", 384, 384, 1, *s(8)),
              ("enc L0 96ch full T4", 96, 96, 4, *s(1)), ("enc L1 192ch 1/2 T4", 192, 192, 4, *s(2))]
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, ci, co, t, h, w in shapes:
        x = torch.randn(1, ci, t + 2, h, w, generator=g).to(dev, dt)
        wt = (torch.randn(co, ci, 3, 3, 3, generator=g) * 0.05).to(dev, dt)
        variants = tap_variants(x, wt)
        ref = variants["conv3d"]().float()
        errs = {k: ((fn().float() - ref).norm() / ref.norm()).item() for k, fn in variants.items()}
        ms = {k: bench(fn, dev, iters) for k, fn in variants.items()}
        flops = 2 * ci * co * 27 * t * h * w
        best = min(ms, key=ms.get)
        rows.append(dict(shape=name, **{f"{k}_ms": round(v, 3) for k, v in ms.items()}, best=best,
                         best_tflops=round(flops / ms[best] / 1e9, 1), conv3d_tflops=round(flops / ms["conv3d"] / 1e9, 1),
                         max_rel_err=max(errs.values())))
    return rows


# ---------------------------------------------------------------------------------------------- the convs a chunk makes
@contextlib.contextmanager
def recorded_convs(log: list):
    """Record every F.conv2d / F.conv3d call (its shapes, layout and parameters) while the block runs."""
    originals = {name: getattr(F, name) for name in ("conv2d", "conv3d")}

    def wrap(name):
        orig = originals[name]

        def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            log.append(dict(op=name, x=tuple(x.shape), x_cl=x.dim() > 3 and x.stride(1) == 1 and x.shape[1] > 1,
                            w=tuple(weight.shape), bias=bias is not None, stride=_tuple(stride, x.dim() - 2),
                            padding=_tuple(padding, x.dim() - 2), dilation=_tuple(dilation, x.dim() - 2),
                            groups=groups, dtype=x.dtype, device=x.device))
            return orig(x, weight, bias, stride, padding, dilation, groups)
        return conv
    for name in originals:
        setattr(F, name, wrap(name))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_costs(calls: list, dev, iters) -> dict:
    """Each distinct conv timed alone as called (layout, bias) and at its floor; ms summed over the calls."""
    groups = defaultdict(int)
    for c in calls:
        groups[tuple(sorted((k, v) for k, v in c.items()))] += 1
    as_run = floor = 0.0
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for key, count in groups.items():
        c = dict(key)
        x = torch.randn(c["x"], generator=g).to(c["device"], c["dtype"])
        w = (torch.randn(c["w"], generator=g) * 0.05).to(c["device"], c["dtype"])
        b = torch.zeros(c["w"][0], device=c["device"], dtype=c["dtype"]) if c["bias"] else None
        fmt = (CL3 if c["op"] == "conv3d" else CL2) if c["x_cl"] else torch.contiguous_format
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        fn = getattr(F, c["op"])
        run = bench(lambda: fn(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"]), dev, iters)
        best, best_name = run, "as run"
        if c["op"] == "conv3d" and c["w"][2] == 3 and c["stride"] == (1, 1, 1) and c["groups"] == 1:
            for name, vfn in tap_variants(x, w, c["padding"][1:]).items():
                t = bench(vfn, dev, iters)
                if t < best:
                    best, best_name = t, name
        elif c["op"] in ("conv2d", "conv3d"):   # the other layout
            other = torch.contiguous_format if c["x_cl"] else (CL3 if c["op"] == "conv3d" else CL2)
            xo, wo = x.contiguous(memory_format=other), w.contiguous(memory_format=other)
            t = bench(lambda: fn(xo, wo, None, c["stride"], c["padding"], c["dilation"], c["groups"]), dev, iters)
            if t < best:
                best, best_name = t, "other layout, no bias"
        if c["bias"]:   # a bias-free conv is what the floor counts (the bias is glue: PyTorch adds it apart)
            t = bench(lambda: fn(x, w, None, c["stride"], c["padding"], c["dilation"], c["groups"]), dev, iters)
            if t < best:
                best, best_name = t, "as run, no bias"
        as_run += count * run
        floor += count * best
        rows.append(dict(op=c["op"], x=list(c["x"]), w=list(c["w"]), bias=c["bias"], channels_last=c["x_cl"],
                         calls=count, as_run_ms=round(run, 3), floor_ms=round(best, 3), floor_variant=best_name))
    rows.sort(key=lambda r: -r["calls"] * r["as_run_ms"])
    return dict(calls=len(calls), distinct=len(groups), as_run_ms=round(as_run, 2), floor_ms=round(floor, 2),
                top=rows[:12])


# ---------------------------------------------------------------------------------------------- the profile by kind
LABELS = {"sdv2::cache_copy": "cache copies", "sdv2::attention": "attention", "sdv2::norm_silu": "norm + SiLU (fused pass)"}
CONV_OPS = ("convolution", "conv2d", "conv3d", "cudnn")
CONV_KERNELS = ("conv", "xmma", "cudnn", "implicit", "gemm", "cutlass", "sm90", "sm80", "nhwc", "nchw", "winograd",
                "fft", "dgrad", "fprop")


@contextlib.contextmanager
def labelled_sites():
    """record_function ranges around the sites a kernel name cannot tell apart (history copies, the norm,
    attention), for the profile's attribution; nothing changes in what runs."""
    from torch.profiler import record_function
    patches = [(vae_state.Batch, "read", "sdv2::cache_copy"), (vae_state.Batch, "keep", "sdv2::cache_copy"),
               (wan_fused, "rms_norm_silu", "sdv2::norm_silu"), (AttentionBlock, "forward", "sdv2::attention")]
    saved = []
    for owner, name, label in patches:
        orig = getattr(owner, name)
        saved.append((owner, name, orig))

        def wrapped(*a, _orig=orig, _label=label, **k):
            with record_function(_label):
                return _orig(*a, **k)
        setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for owner, name, orig in saved:
            setattr(owner, name, orig)


def kind_of(kernel: str, ancestry: list[str]) -> str:
    """The kind of work of one kernel (or, on a CPU, one op), from its name and the ops it was launched in."""
    k = kernel.lower()
    if "_rms_silu_kernel" in k:
        return "norm + SiLU (fused pass)"
    for label, kind in LABELS.items():
        if label in ancestry:
            return kind
    if any(any(c in a.lower() for c in CONV_OPS) for a in ancestry):
        if k.startswith("aten::") or any(c in k for c in CONV_KERNELS):   # a CPU op inside a conv, or a conv kernel
            return "conv"
        return "conv bias (added after cuDNN)" if "add" in k or "elementwise" in k else "conv (layout inside)"
    op = next((a for a in ancestry if a.startswith("aten::")), kernel)
    if op in ("aten::fill_", "aten::zero_", "aten::zeros"):
        return "padding (zero fills)"
    if op in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy"):
        return "layout copies"
    if op in ("aten::add", "aten::add_"):
        return "adds (residual, bias)"
    if op == "aten::cat":
        return "cat (history joins)"
    if "silu" in op:
        return "SiLU"
    if op in ("aten::linalg_vector_norm", "aten::norm", "aten::div", "aten::mul", "aten::clamp_min", "aten::normalize"):
        return "norm (eager)"
    if "upsample" in op:
        return "upsample"
    return "other"


def profile_kinds(fn, dev, calls: int) -> dict:
    """ms per call of ``fn`` by kind of work."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with labelled_sites(), profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(dev)
    kinds = defaultdict(float)
    events = prof.events()
    use_kernels = dev.type == "cuda" and any(getattr(e, "kernels", None) for e in events)
    for e in events:
        ancestry, p = [e.name], e.cpu_parent
        while p is not None:
            ancestry.append(p.name)
            p = p.cpu_parent
        if use_kernels:
            for kern in getattr(e, "kernels", []) or []:
                kinds[kind_of(kern.name, ancestry)] += kern.duration / 1e3 / calls
        elif dev.type != "cuda" and not e.cpu_children:   # CPU: leaf ops' self time
            kinds[kind_of(e.name, ancestry)] += e.self_cpu_time_total / 1e3 / calls
    if dev.type == "cuda" and not use_kernels:   # a profiler without kernel links: kernel names only
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t and "CUDA" in str(getattr(e, "device_type", "")):
                kinds[kind_of(e.key, [])] += t / 1e3 / calls
    out = {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    out["total"] = round(sum(kinds.values()), 3)
    out["attribution"] = "kernels -> launching op" if use_kernels else ("cpu op self time" if dev.type != "cuda"
                                                                         else "kernel names only")
    return out


# ---------------------------------------------------------------------------------------------- driving a VAE
def streams_inputs(n, height, width, dev, dt, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    v5 = (torch.rand(n, 3, 5, height, width, generator=g) * 2 - 1).to(dev, dt)
    v4 = (torch.rand(n, 3, 4, height, width, generator=g) * 2 - 1).to(dev, dt)
    z2 = torch.randn(n, 2, 16, height // 8, width // 8, generator=g).to(dev, dt)
    z1 = torch.randn(n, 1, 16, height // 8, width // 8, generator=g).to(dev, dt)
    return v5, v4, z2, z1


def started(vae, n, inputs, warm):
    """n streams past their first chunk (and ``warm`` steady ones: autotuning, graph capture)."""
    v5, v4, z2, z1 = inputs
    states = [vae.new_state() for _ in range(n)]
    vae.encode_streams(states, v5)
    vae.decode_streams(states, z2)
    for _ in range(warm):
        vae.encode_streams(states, v4)
        vae.decode_streams(states, z1)
    return states


def step_times(vae, n, inputs, dev, iters):
    states = started(vae, n, inputs, 3)
    v5, v4, z2, z1 = inputs
    return (bench(lambda: vae.encode_streams(states, v4), dev, iters, 1),
            bench(lambda: vae.decode_streams(states, z1), dev, iters, 1))


def memory(make, height, width, dev, dt, counts=(1, 2, 4)):
    """Per stream: its state (history) bytes; per added stream: the rise of a batched call's peak (fused +
    CUDA graph, steady state, the graphs captured)."""
    out = {"state_gib_per_stream": round(per_stream_bytes(make(), height, width) / 2 ** 30, 3)}
    peaks = {}
    for n in counts:
        vae = make()
        inputs = streams_inputs(n, height, width, dev, dt)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        states = started(vae, n, inputs, 3)
        vae.encode_streams(states, inputs[1])
        vae.decode_streams(states, inputs[3])
        sync(dev)
        peaks[n] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        out[f"states_gib_{n}"] = round(sum(state_nbytes(s) for s in states) / 2 ** 30, 3)
        del vae, states, inputs
    out.update({f"peak_gib_{n}_streams": round(v, 3) for n, v in peaks.items()})
    ns = sorted(peaks)
    out["peak_gib_per_added_stream"] = round((peaks[ns[-1]] - peaks[ns[0]]) / (ns[-1] - ns[0]), 3)
    return out


def check_streams(dim, a, dev, chunks=4):
    """Streams A, B from chunk 0 and C from chunk 1, batched per phase (fused + CUDA graph), against each alone."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        base = load_wan_vae(dummy=True, dim=dim, device=dev, dtype=torch.float32)
        alone = install_fused(copy.deepcopy(base))
        batched = accelerate_vae(install_fused(copy.deepcopy(base)), "cuda_graph" if dev.type == "cuda" else "none")
        g = torch.Generator(device="cpu").manual_seed(5)
        video = {n: [(torch.rand(1, 3, 5 if c == 0 else 4, a.height, a.width, generator=g) * 2 - 1).to(dev)
                     for c in range(chunks)] for n in "ABC"}
        join = {"A": 0, "B": 0, "C": 1}
        want = {}
        for n in "ABC":
            st = alone.new_state()
            want[n] = [alone.decode(st, alone.encode(st, x)) for x in video[n]]
        states, got = {n: batched.new_state() for n in "ABC"}, {n: [] for n in "ABC"}
        for step in range(chunks + 1):
            live = [n for n in "ABC" if join[n] <= step < join[n] + chunks]
            for first in (True, False):
                group = [n for n in live if (step == join[n]) == first]
                if group:
                    sts = [states[n] for n in group]
                    z = batched.encode_streams(sts, torch.cat([video[n][step - join[n]] for n in group]))
                    for n, x in zip(group, batched.decode_streams(sts, z).split(1)):
                        got[n].append(x)
        err = max(((x.double() - y.double()).norm() / y.double().norm()).item()
                  for n in "ABC" for x, y in zip(got[n], want[n]))
        return dict(dim=dim, max_rel_err=err, chunks_per_stream={n: len(got[n]) for n in "ABC"},
                    graphs_captured={k: getattr(v, "captures", None) for k, v in batched._steps.items()},
                    fallbacks=[f"{k}: {v.fallback_reason}" for k, v in batched._steps.items()
                               if getattr(v, "fallback_reason", None)], passed=err <= 1e-5)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def profile_vae(dim, a, dev, dt):
    torch.manual_seed(0)
    eager = load_wan_vae(dummy=True, dim=dim, device=dev, dtype=dt)
    fused = install_fused(copy.deepcopy(eager))
    graphed = accelerate_vae(install_fused(copy.deepcopy(eager)), "cuda_graph" if dev.type == "cuda" else "none")
    res = {"dim": dim}
    one = streams_inputs(1, a.height, a.width, dev, dt)
    # the convs of one steady chunk, then the profile by kind
    states = started(fused, 1, one, 2)
    for step, x in (("encode", one[1]), ("decode", one[3])):
        call = (lambda x=x: fused.encode_streams(states, x)) if step == "encode" else \
            (lambda x=x: fused.decode_streams(states, x))
        calls = []
        with recorded_convs(calls):
            call()
        res[f"{step}_convs"] = conv_costs(calls, dev, a.iters)
        res[f"{step}_profile"] = profile_kinds(call, dev, max(1, a.iters // 4))
        print(f"  dim {dim} {step}: convs as run {res[f'{step}_convs']['as_run_ms']} ms, floor "
              f"{res[f'{step}_convs']['floor_ms']} ms; profile {json.dumps(res[f'{step}_profile'])}", flush=True)
    # whole steps, one stream and N in one call
    steps = {}
    for n in a.stream_counts:
        inputs = streams_inputs(n, a.height, a.width, dev, dt)
        for name, vae in (("eager", eager), ("fused", fused), ("fused_graph", graphed)):
            if name == "eager" and n > 1 and dev.type == "cpu":
                continue
            enc, dec = step_times(vae, n, inputs, dev, a.iters)
            steps[f"{name}_{n}"] = dict(encode_ms=round(enc, 2), decode_ms=round(dec, 2),
                                        encode_fps_total=round(4 * n * 1e3 / enc, 1),
                                        decode_fps_total=round(4 * n * 1e3 / dec, 1))
            print(f"  dim {dim} {name}, {n} stream(s): encode {enc:.2f} ms, decode {dec:.2f} ms per call", flush=True)
    res["steps"] = steps
    if dev.type == "cuda" and a.memory:
        make = lambda: accelerate_vae(install_fused(load_wan_vae(dummy=True, dim=dim, device=dev, dtype=dt)),  # noqa
                                      "cuda_graph")
        res["memory"] = memory(make, a.height, a.width, dev, dt)
        print(f"  dim {dim} memory: {json.dumps(res['memory'])}", flush=True)
    else:   # shapes only: the exact state count at this size (and at 480x832)
        meta = load_wan_vae(dummy=True, dim=dim, device="meta", dtype=dt)
        res["memory"] = {"state_gib_per_stream": round(per_stream_bytes(meta, a.height, a.width) / 2 ** 30, 4),
                         "state_gib_per_stream_480x832": round(per_stream_bytes(meta, 480, 832) / 2 ** 30, 3),
                         "note": "state counted on the meta device; the peak per added stream needs CUDA"}
        print(f"  dim {dim} memory: {json.dumps(res['memory'])}", flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dims", default="96,24", help="Wan VAE base widths: 96 = Wan2.1_VAE.pth, 24 = lightvaew2_1")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--streams", default="1,4", help="streams per call for the steps section")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-floor", dest="floor", action="store_false")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    dt = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    a.stream_counts = [int(n) for n in a.streams.split(",")]
    torch.backends.cudnn.benchmark = True
    report = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "res": f"{a.height}x{a.width}", "dtype": str(dt),
              "weights": "DUMMY", "vaes": []}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    with torch.no_grad():
        if a.floor:
            report["floor"] = floor_table(dev, dt, a.height, a.width, a.iters)
            print("| shape | conv3d ms | conv3d CL ms | stacked conv2d ms | 3x conv2d ms | best | best TFLOP/s | "
                  "conv3d TFLOP/s | max rel err |\n|---|---|---|---|---|---|---|---|---|")
            for r in report["floor"]:
                print(f"| {r['shape']} | {r['conv3d_ms']} | {r['conv3d_cl_ms']} | {r['stacked_conv2d_ms']} | "
                      f"{r['three_conv2d_ms']} | {r['best']} | {r['best_tflops']} | {r['conv3d_tflops']} | "
                      f"{r['max_rel_err']:.1e} |", flush=True)
            save()
        if a.check:
            report["check"] = []
            for dim in map(int, a.dims.split(",")):
                try:
                    report["check"].append(check_streams(dim, a, dev))
                except Exception as exc:  # noqa: BLE001
                    report["check"].append({"dim": dim, "error": f"{type(exc).__name__}: {exc}", "passed": False})
                print("check (3 streams in one graphed call vs alone, fp32):", json.dumps(report["check"][-1]),
                      "PASS" if report["check"][-1].get("passed") else "FAIL", flush=True)
                save()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        for dim in map(int, a.dims.split(",")):
            try:
                report["vaes"].append(profile_vae(dim, a, dev, dt))
            except Exception as exc:  # noqa: BLE001 -- one VAE failing must not lose the other's numbers
                import traceback
                traceback.print_exc()
                report["vaes"].append({"dim": dim, "error": f"{type(exc).__name__}: {exc}"})
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n# {report['gpu']}, torch {report['torch']}, {report['res']}, {dt}, DUMMY weights; ms per steady chunk")
    for v in report["vaes"]:
        if "error" in v:
            print(f"dim {v['dim']}: FAILED {v['error']}")
            continue
        kinds = sorted(set(v["encode_profile"]) | set(v["decode_profile"]) - {"attribution"})
        print(f"\n## Wan VAE, base width {v['dim']} (fused path, no graph)\n| kind | encode ms | decode ms |\n|---|---|---|")
        for k in kinds:
            if k != "attribution":
                print(f"| {k} | {v['encode_profile'].get(k, 0)} | {v['decode_profile'].get(k, 0)} |")
        for step in ("encode", "decode"):
            c = v[f"{step}_convs"]
            print(f"{step}: {c['calls']} convs ({c['distinct']} distinct): {c['as_run_ms']} ms timed alone as run, "
                  f"{c['floor_ms']} ms at their floor; glue = profile total - convs")
        print("steps:", json.dumps(v["steps"]))
        print("memory:", json.dumps(v["memory"]))
    save()


if __name__ == "__main__":
    main()
