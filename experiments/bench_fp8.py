"""FP8 (e4m3) vs bf16 DiT: step speed at 1.3B and 14B and the velocity error over a 40-chunk stream.

    python experiments/bench_fp8.py --json fp8.json          # GPU: wan_1_3b and wan_14b at 480x832
    python experiments/bench_fp8.py --device cpu --sizes tiny --height 64 --width 96 --chunks 8 --iters 2

Per model size, the same dummy weights and the same inputs go through each variant (bf16, and FP8 with
per-row or per-tensor scales, fast or exact accumulation; 1.3B also keeps an fp32 model as the reference):
* a 40-chunk stream (a 2-latent-frame first chunk, then 1-frame chunks; KV cache N=6, 3 sinks, refresh 0.2,
  one row = 1 denoising step, t=700): relative L2 of each chunk's velocity against bf16 (and fp32);
* then, with the cache full, the step time: eager calls timed with CUDA events, and replays of the
  project's CUDA graph (``cuda_graph.CUDAGraphStep``, if it runs; the eager 1.3B step is host-bound);
* before that, the FP8 GEMM itself on the model's shapes against float64 and its speed against bf16.
Only ``load_backbone``, ``model.new_cache``, ``model.set_prompt`` and ``model(x, t, cache, starts)`` are used.
WEIGHTS ARE DUMMY (random): the speed is real; the error measures FP8 rounding on random weights and
activations, not on trained ones (real activations have outliers that per-tensor scales handle worse).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from sdv2_lab.backbones import fp8
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
T0 = time.monotonic()
# (name, quantize_dit kwargs or None for bf16)
COMPILED_QUANT = True  # set to False (and said so in the rows) if torch.compile fails on this machine
VARIANTS = {"bf16": None, "fp8_row": dict(granularity="row"), "fp8_row_exact": dict(granularity="row", fast_accum=False),
            "fp8_tensor": dict(granularity="tensor")}


def backbone(name: str, attention: str) -> WanDiTConfig:
    """conf/backbone/<name>.yaml read without Hydra (the GPU image has none)."""
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return WanDiTConfig(attention=attention, **{k: v for k, v in data.items() if not k.startswith("_")})


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

    def time_steps(self, iters, runner=None, warmup=2):
        """Median ms of the model call alone (inputs are made before the first event)."""
        for _ in range(warmup):
            self.step(runner)
        times = []
        for _ in range(iters):
            inputs = self.next_inputs()
            if self.device.type == "cuda":
                e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
                e0.record()
                self.run(inputs, runner)
                e1.record()
                times.append((e0, e1))
            else:
                t0 = time.perf_counter()
                self.run(inputs, runner)
                times.append(1e3 * (time.perf_counter() - t0))
        sync(self.device)
        ms = sorted(a.elapsed_time(b) for a, b in times) if self.device.type == "cuda" else sorted(times)
        return ms[len(ms) // 2]


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


def graph_runner(stream):
    """The project's CUDA-graph step, if it fits the KV cache in this tree (both are being refactored): a
    graph must read the plan from a buffer that stays put, or its replays would index freed memory."""
    import inspect
    from sdv2_lab.backbones.cuda_graph import CUDAGraphStep
    if "out=" not in inspect.getsource(CUDAGraphStep):
        raise RuntimeError("skipped: cuda_graph.CUDAGraphStep passes no fixed plan buffer to this tree's KV cache")
    return CUDAGraphStep(stream.model, stream.cache)


def run_variant(base, name, kw, a, device, refs, consume):
    # a copy unless this variant may change the base in place (the last one) or leaves it as it is
    model = base if consume or (kw is None and base.patch_embedding.weight.dtype == a.dtype) else copy.deepcopy(base)
    if model.patch_embedding.weight.dtype != a.dtype:
        model = model.to(a.dtype)
    model.fuse_qkv()  # .to() and deepcopy keep q/k/v weights but not always their fusion
    if kw is not None:
        fp8.quantize_dit(model, **kw)
        if not COMPILED_QUANT:  # torch.compile failed here once: eager activation quantization
            for m in model.modules():
                if isinstance(m, fp8.Fp8Linear):
                    m._quantize = fp8._activation_quantizer(m.granularity, compiled=False)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # q/k/v views count once
                for t in list(model.parameters()) + list(model.buffers())}
    weight_gib = sum(storages.values()) / 2 ** 30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = Stream(model, a, device)
    outs = [s.step().float() for _ in range(a.chunks)]
    row = dict(model=model.cfg.name, variant=name, weights_gib=round(weight_gib, 2))
    for ref_name, ref in refs.items():
        errs = [rel(o, r) for o, r in zip(outs, ref)]
        row[f"err_vs_{ref_name}"] = dict(median=round(sorted(errs)[len(errs) // 2], 5), max=round(max(errs), 5),
                                         first=round(errs[0], 5), last=round(errs[-1], 5),
                                         per_chunk=[round(e, 5) for e in errs])
    row["eager_ms"] = round(s.time_steps(a.iters), 2)
    if device.type == "cuda":
        try:
            row["gpu_busy_ms"] = round(gpu_busy_ms(s, 5), 2)
        except Exception as exc:  # noqa: BLE001
            row["gpu_busy_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        try:
            row["graph_ms"] = round(s.time_steps(a.iters, graph_runner(s), warmup=3), 2)
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    best = row.get("graph_ms", row.get("gpu_busy_ms", row["eager_ms"]))
    row["dit_fps"] = round(4e3 / best, 1)  # one 1-frame chunk = 4 video frames; graph, else kernel time
    del s
    return row, outs, model


def main():
    global COMPILED_QUANT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="wan_14b,wan_1_3b", help="in this order (14B first: it matters most)")
    p.add_argument("--variants", default="bf16,fp8_row,fp8_tensor,fp8_row_exact", help=f"of {list(VARIANTS)}")
    p.add_argument("--variants-14b", default="bf16,fp8_row", help="for wan_14b (each 14B variant is a 28 GB model)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="sdpa")
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
    a.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
                if VARIANTS[v] is not None and COMPILED_QUANT and device.type == "cuda":
                    COMPILED_QUANT = False  # retry once with eager activation quantization
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
