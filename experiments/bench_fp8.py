"""FP8 (e4m3) vs bf16 DiT, ours (fp8.py) vs torchao's float8: step speed at 1.3B and 14B, the velocity error
over a 40-chunk stream.

    python experiments/bench_fp8.py --json fp8.json          # GPU: wan_14b and wan_1_3b at 480x832
    python experiments/bench_fp8.py --device cpu --sizes tiny --height 64 --width 96 --chunks 8 --iters 2

Per model size, the same dummy weights and the same inputs go through each variant (bf16; FP8 ours with
per-row or per-tensor scales, fast or exact accumulation; FP8 torchao, ``fp8_kernel=torchao``, per row or
per tensor, its quantize + GEMM compiled or eager; 1.3B also keeps an fp32 model as the reference):
* a 40-chunk stream (a 2-latent-frame first chunk, then 1-frame chunks; KV cache N=6, 3 sinks, refresh 0.2,
  one row = 1 denoising step, t=700): relative L2 of each chunk's velocity against bf16 (and fp32);
* the steady-state step time through the pipeline's executors (``stream/executor.py``: plan, DiT, x0 and
  re-noising, a full cache), eager and replayed from its CUDA graph (the eager 1.3B step is host-bound), timed
  with CUDA events; the graph's capture is also the proof that the step makes no host sync (a sync fails a
  capture); an eager step's sync warnings (``torch.cuda.set_sync_debug_mode``) are counted against bf16's;
* before that, the FP8 GEMM itself on the model's shapes against float64 and its speed against bf16.
On a CPU the torchao rows say why they did not run (torchao 0.18 quantizes float8 on CUDA only).
WEIGHTS ARE DUMMY (random): the speed is real; the error measures FP8 rounding on random weights and
activations, not on trained ones (real activations have outliers that per-tensor scales handle worse).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch

from sdv2_lab.backbones import fp8
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.stream.executor import build_executor
from sdv2_lab.stream.scheduler import Scheduler
from sdv2_lab.stream.timing import Clock

T0 = time.monotonic()
# name -> None for bf16, or the FP8 kernel (fp8.FP8_KERNELS) and its quantize function's kwargs
# per FP8 kernel: set to False (and said so in the rows) if torch.compile fails with it on this machine
COMPILED_QUANT = {"ours": True, "torchao": True}
VARIANTS = {"bf16": None,
            "fp8_row": dict(kernel="ours", granularity="row"),
            "fp8_row_exact": dict(kernel="ours", granularity="row", fast_accum=False),
            "fp8_tensor": dict(kernel="ours", granularity="tensor"),
            "fp8_ao_row": dict(kernel="torchao", granularity="row"),
            "fp8_ao_tensor": dict(kernel="torchao", granularity="tensor"),
            "fp8_ao_row_eager": dict(kernel="torchao", granularity="row", compiled=False)}


def quantize(model, kw, compiled=None):
    """``model`` quantized in place by the variant's kernel; compiled=False: eager activation quantization."""
    kw = dict(kw)
    kernel = kw.pop("kernel")
    if compiled is not None:
        kw["compiled"] = compiled
    return fp8.FP8_KERNELS[kernel](model, **kw)


def linear_holder(lin):
    """A module holding a copy of ``lin`` as ``lin`` (torchao's quantize works on modules, in place)."""
    holder = torch.nn.Module()
    holder.lin = copy.deepcopy(lin)
    return holder


def backbone(name: str, attention: str) -> WanDiTConfig:
    """conf/backbone/<name>.yaml with attention backend ``attention``, as every entry point reads it (Hydra's
    composition: the backbone files have defaults lists; the GPU box gets hydra-core from gpu_wheels.sh)."""
    from sdv2_lab import build
    return build.backbone_config(build.compose_config("config", [f"backbone={name}", f"attention={attention}"]))


def elapsed():
    return time.monotonic() - T0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ the FP8 GEMM on the model's shapes
@torch.no_grad()
def gemm_check(cfg: WanDiTConfig, tokens: int, device) -> list[dict]:
    """Each (K, N) of a block: FP8 linear vs float64 (exactness and total error) and its time vs bf16."""
    d, f = cfg.dim, cfg.ffn_dim
    rows = []
    for what, k, n in (("qkv", d, 3 * d), ("o / cross q,o", d, d), ("ffn.0", d, f), ("ffn.2", f, d)):
        lin = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        ref = x.double() @ lin.weight.double().t() + lin.bias.double()
        row = dict(model=cfg.name, layer=what, M=tokens, K=k, N=n)
        for name, kw in list(VARIANTS.items())[1:]:
            if kw["kernel"] == "torchao":
                try:
                    m = quantize(linear_holder(lin), dict(kw, include="lin"),
                                 None if COMPILED_QUANT["torchao"] else False).lin
                except Exception as exc:  # noqa: BLE001 - e.g. a CPU: said in the row
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    continue
                row[f"{name}_vs_f64"] = round(rel(m(x), ref), 5)
                if device.type == "cuda":
                    row[f"{name}_us"] = round(1e3 * bench_ms(lambda: m(x)), 1)
                continue
            m = fp8.Fp8Linear.from_weight(lin.weight, lin.bias, kw["granularity"], gemm=fp8._pick_gemm("auto", device),
                                          fast_accum=kw.get("fast_accum", True), compiled=device.type == "cuda")
            out = m(x)
            xq, xs = fp8.quantize(x, kw["granularity"])
            ref_q = fp8.dequantize(xq, xs).double() @ fp8.dequantize(m.weight, m.weight_scale.t()).double().t() \
                + m.bias.double()
            qc, sc = m._quantize(x)
            row[f"{name}_gemm_vs_f64_of_fp8_operands"] = round(rel(out, ref_q), 6)  # bf16 output rounding only
            row[f"{name}_vs_f64"] = round(rel(out, ref), 5)
            row[f"{name}_quant_bitwise_eager"] = bool(torch.equal(qc.view(torch.uint8), xq.view(torch.uint8))
                                                      and torch.equal(sc, xs))
            if device.type == "cuda":
                row[f"{name}_us"] = round(1e3 * bench_ms(lambda: m(x)), 1)
                if name == "fp8_row":
                    row["fp8_row_quant_us"] = round(1e3 * bench_ms(lambda: m._quantize(x)), 1)
                    row["fp8_row_gemm_only_us"] = round(1e3 * bench_ms(lambda: m._gemm(qc, sc, m.weight, m.weight_scale,
                                                                                      m.bias, x.dtype)), 1)
        row["bf16_vs_f64"] = round(rel(lin(x), ref), 5)
        if device.type == "cuda":
            row["bf16_us"] = round(1e3 * bench_ms(lambda: lin(x)), 1)
        rows.append(row)
    return rows


def bench_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


# ------------------------------------------------------------------ the stream
class Stream:
    """One stream through ``model``: chunk j has its own fixed input, the same for every variant."""

    def __init__(self, model, a, device):
        self.model, self.a, self.device = model, a, device
        self.dtype = model.patch_embedding.weight.dtype
        self.cache = model.new_cache(1, a.height, a.width, a.num_kv, a.sink, a.threshold)
        self.S = self.cache.spec.frame_tokens
        g = torch.Generator(device=device).manual_seed(1234)
        model.set_prompt(self.cache, torch.randn(1, 512, model.cfg.text_dim, device=device, generator=g).to(self.dtype))
        self.chunk = 0

    def inputs(self, j):
        f = 2 if j == 0 else 1
        g = torch.Generator(device=self.device).manual_seed(10_000 + j)
        x = torch.randn(1, f, 16, self.a.height // 8, self.a.width // 8, device=self.device, generator=g)
        return x.to(self.dtype), torch.full((1, f), 700.0, device=self.device), [0 if j == 0 else (j + 1) * self.S]

    def next_inputs(self):
        self.chunk += 1
        return self.inputs(self.chunk - 1)

    @torch.no_grad()
    def run(self, inputs, runner=None):
        x, t, starts = inputs
        return runner(x, t, starts) if runner else self.model(x, t, self.cache, starts)

    def step(self, runner=None):
        return self.run(self.next_inputs(), runner)


def gpu_busy_ms(stream, iters):
    """Summed device time of one step's kernels (CUPTI): the floor a CUDA-graph replay of the step approaches,
    free of the host launch time that dominates an eager 1.3B step."""
    from torch.profiler import ProfilerActivity, profile
    inputs = [stream.next_inputs() for _ in range(iters)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for x in inputs:
            stream.run(x)
        torch.cuda.synchronize()
    from torch.autograd import DeviceType
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # kernels, copies, memsets
    if not device_events:
        raise RuntimeError("the profiler recorded no device events")
    return sum(e.time_range.elapsed_us() for e in device_events) / 1e3 / iters


def executor_step_ms(model, a, device, graph: bool) -> dict:
    """Median ms of a steady-state 1-step stream-batch job (a full KV cache) through the pipeline's executor,
    eager or replayed from its CUDA graph: plan, DiT, velocity -> x0, re-noising, as in bench_dit.py."""
    dtype = model.patch_embedding.weight.dtype
    clock = Clock(device)
    cache = model.new_cache(1, a.height, a.width, a.num_kv, a.sink, a.threshold)
    executor = build_executor("cuda_graph" if graph else "eager", model, cache)
    scheduler = Scheduler("single", [700], cache.spec, max_streams=1)
    lat = (16, a.height // 8, a.width // 8)
    t = torch.tensor([700], device=device)
    g = torch.Generator(device=device).manual_seed(99)
    timings = []
    with torch.no_grad():
        s = scheduler.open("p")
        executor.set_prompt(s.rows, torch.randn(1, 512, model.cfg.text_dim, device=device, generator=g).to(dtype))
        (job,) = scheduler.dit_jobs([scheduler.noise_chunk(s)])
        executor.run(job, torch.randn(1, 2, *lat, device=device, generator=g).to(dtype), t[:, None], None)
        ring = torch.randn(1, 1, *lat, device=device, generator=g).to(dtype)
        noise = torch.randn_like(ring)
        total = a.num_kv + 3 + a.iters  # the cache fills (its own graph), then the full-cache graph's replays
        for i in range(total):
            (job,) = scheduler.dit_jobs([scheduler.noise_chunk(s)])
            t0 = clock.now()
            ring = executor.run(job, ring, t, noise).next_x
            t1 = clock.now()
            if i >= total - a.iters:
                timings.append((t0, t1))
    ms = sorted(1e3 * (clock.seconds(t1) - clock.seconds(t0)) for t0, t1 in timings)
    out = dict(ms=round(ms[len(ms) // 2], 2))
    if graph:
        out.update(captures=executor.captures, replays=executor.replays)
    executor.release()
    return out


def eager_sync_warnings(model, a, device) -> int:
    """Host syncs (``torch.cuda.set_sync_debug_mode`` warnings) in one eager DiT step, the plan included."""
    stream = Stream(model, a, device)
    stream.step()  # first call: lazy initialisation, compiles
    inputs = stream.next_inputs()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stream.run(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers; a tensor subclass (torchao's Float8Tensor) by its inner
    tensors; views of one storage (q/k/v of the fused weight) count once."""
    storages = {}

    def add(t):
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    return sum(storages.values())


def run_variant(base, name, kw, a, device, refs, consume):
    # a copy unless this variant may change the base in place (the last one) or leaves it as it is
    model = base if consume or (kw is None and base.patch_embedding.weight.dtype == a.dtype) else copy.deepcopy(base)
    if model.patch_embedding.weight.dtype != a.dtype:
        model = model.to(a.dtype)
    model.fuse_qkv()  # .to() and deepcopy keep q/k/v weights but not always their fusion
    if kw is not None:
        quantize(model, kw, None if COMPILED_QUANT[kw["kernel"]] else False)  # False: torch.compile failed
    row = dict(model=model.cfg.name, variant=name, weights_gib=round(weight_bytes(model) / 2 ** 30, 2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = Stream(model, a, device)
    outs = [s.step().float() for _ in range(a.chunks)]
    for ref_name, ref in refs.items():
        errs = [rel(o, r) for o, r in zip(outs, ref)]
        row[f"err_vs_{ref_name}"] = dict(median=round(sorted(errs)[len(errs) // 2], 5), max=round(max(errs), 5),
                                         first=round(errs[0], 5), last=round(errs[-1], 5),
                                         per_chunk=[round(e, 5) for e in errs])
    row["eager_ms"] = executor_step_ms(model, a, device, graph=False)["ms"]
    if device.type == "cuda":
        try:
            row["gpu_busy_ms"] = round(gpu_busy_ms(s, 5), 2)
        except Exception as exc:  # noqa: BLE001
            row["gpu_busy_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        try:
            row["eager_sync_warnings"] = eager_sync_warnings(model, a, device)
        except Exception as exc:  # noqa: BLE001
            row["sync_check_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        try:
            graphed = executor_step_ms(model, a, device, graph=True)
            row["graph_ms"] = graphed["ms"]
            row["graph_captures"], row["graph_replays"] = graphed["captures"], graphed["replays"]
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    best = row.get("graph_ms", row.get("gpu_busy_ms", row["eager_ms"]))
    row["dit_fps"] = round(4e3 / best, 1)  # one 1-frame chunk = 4 video frames; graph, else kernel time
    del s
    return row, outs, model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="wan_14b,wan_1_3b", help="in this order (14B first: it matters most)")
    p.add_argument("--variants", default="bf16,fp8_row,fp8_tensor,fp8_ao_row,fp8_ao_tensor,fp8_row_exact",
                   help=f"of {list(VARIANTS)}")
    p.add_argument("--variants-14b", default="bf16,fp8_row,fp8_ao_row",
                   help="for wan_14b (each 14B variant is a 28 GB model)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--dtype", default="auto", help="the model's: auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--num-kv", type=int, default=6)
    p.add_argument("--sink", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--fp32-ref-max-dim", type=int, default=2048, help="fp32 reference for models up to this dim")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference's patch-embedding conv in true fp32
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    a.dtype = auto if a.dtype == "auto" else getattr(torch, a.dtype)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = dict(gpu=gpu, torch=torch.__version__, height=a.height, width=a.width, num_kv=a.num_kv, sink=a.sink,
                  threshold=a.threshold, chunks=a.chunks, weights="dummy", gemm=[], dit=[])

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))

    print(f"# {gpu}, torch {torch.__version__}; WEIGHTS ARE DUMMY (random)", flush=True)
    sizes = a.sizes.split(",")
    tokens = (a.height // 16) * (a.width // 16)
    for name in sizes:
        cfg = backbone(name, a.attention)
        try:
            result["gemm"] += gemm_check(cfg, tokens, device)
        except Exception as exc:  # noqa: BLE001
            result["gemm"].append(dict(model=name, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        print(json.dumps(result["gemm"][-4:]), flush=True)
        save()
    for name in sizes:
        if elapsed() > a.budget_s:
            print(f"# budget spent: {name} skipped", flush=True)
            break
        cfg = backbone(name, a.attention)
        variants = (a.variants_14b if name == "wan_14b" else a.variants).split(",")
        fp32_ref = cfg.dim <= a.fp32_ref_max_dim and device.type == "cuda"
        base = load_backbone(cfg, "dummy", device=device, dtype=torch.float32 if fp32_ref else a.dtype)
        refs = {}
        if fp32_ref:  # the same weights in fp32 (no TF32): the yardstick for bf16's own error
            s = Stream(base, a, device)
            refs["fp32"] = [s.step().float() for _ in range(a.chunks)]
            del s
        for i, v in enumerate(variants):
            if elapsed() > a.budget_s:
                print(f"# budget spent: {name}/{v} skipped", flush=True)
                break
            consume = not fp32_ref and i == len(variants) - 1  # the last variant may quantize the base in place
            try:
                row, outs, model = run_variant(base, v, VARIANTS[v], a, device, refs, consume)
            except Exception as exc:  # noqa: BLE001
                row, outs, model = dict(model=name, variant=v, error=f"{type(exc).__name__}: {str(exc)[:500]}"), None, None
                kernel = VARIANTS[v]["kernel"] if VARIANTS[v] is not None else None
                if kernel is not None and COMPILED_QUANT[kernel] and device.type == "cuda" \
                        and VARIANTS[v].get("compiled", True):
                    COMPILED_QUANT[kernel] = False  # retry once (and from now on) with this kernel eager
                    print(f"# {v} failed ({row['error'][:200]}); retrying with eager activation quantization", flush=True)
                    try:
                        row, outs, model = run_variant(base, v, VARIANTS[v], a, device, refs, consume)
                        row["quant"] = "eager (torch.compile failed)"
                    except Exception as exc2:  # noqa: BLE001
                        row["retry_error"] = f"{type(exc2).__name__}: {str(exc2)[:500]}"
            if v == "bf16" and outs is not None:
                refs["bf16"] = outs
            result["dit"].append(row)
            short = {k: (x if not isinstance(x, dict) else {kk: vv for kk, vv in x.items() if kk != "per_chunk"})
                     for k, x in row.items()}
            print(json.dumps(short), flush=True)
            save()
            if model is not base:
                del model
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del base, refs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(result), flush=True)
    save()


def table(result) -> str:
    lines = ["| model | variant | eager ms | GPU busy ms | graph ms | DiT FPS | err vs bf16 (median / max) "
             "| err vs fp32 (median / max) | weights GiB | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["dit"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        e = lambda k: f"{r[k]['median']:.4f} / {r[k]['max']:.4f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r['variant']} | {r['eager_ms']} | {r.get('gpu_busy_ms', '-')} | "
                     f"{r.get('graph_ms', '-')} | {r['dit_fps']} | "
                     f"{e('err_vs_bf16')} | {e('err_vs_fp32')} | {r['weights_gib']} | {r.get('peak_gib', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
