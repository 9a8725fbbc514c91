"""SDPA's kernels (flash, cuDNN, memory-efficient) against FlexAttention (and FA4 if installed) at the DiT's
KV-cache shapes.

    python experiments/bench_attention.py --json attention.json     # GPU
    python experiments/bench_attention.py --checks                  # graph capture + masked calls (own process)

Shapes (bf16, head dim 128, 480x832): self-attention q [rows, 1560, H, 128] over the full cache k, v
[rows, 9360, H, 128] (6 latent frames), cross-attention q [rows, 1560, H, 128] over 512 text tokens; H = 12
(1.3B) or 40 (14B); rows 1, 2, 4, 8 (stream-batch rows). Inputs come in the layouts the model hands a backend
([B, L, H, D]; the text K/V as transposed [B, H, 512, D]). Per kernel: median time (triton do_bench, L2 flushed
between calls), TFLOP/s = 4*rows*H*Lq*Lk*D / time, and at rows=1 the error against fp32 math. ``sdpa`` is the
registry backend (attention.SDPA_CUDA_ORDER); the profiler names the kernel it ran. ``--checks`` captures the
registry's ``sdpa`` into a CUDA graph at a shape it has not seen (as the pipeline's graph does) and runs it
with per-row key lengths (the cache-fill calls), both against fp32 math.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdv2_lab.backbones.attention import SDPA_CUDA_ORDER, SDPA_KERNELS, _key_mask, get_attention

HEADS = {"1.3B": 12, "14B": 40}
KEYS = {"self": 9360, "cross": 512}
LQ, D = 1560, 128
T0 = time.monotonic()


def inputs(rows, heads, kind, lq=LQ, lk=None, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    lk = lk or KEYS[kind]
    q = torch.randn(rows, lq, heads, D, device="cuda", dtype=torch.bfloat16, generator=g)
    if kind == "cross":  # the cache keeps text K/V as [B, H, Ltxt, D]; the model passes transposed views
        k, v = (torch.randn(rows, heads, lk, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                for _ in range(2))
    else:
        k, v = (torch.randn(rows, lk, heads, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    return q, k, v


def pinned(kernel):
    """SDPA restricted to one kernel (an error if it cannot run the call)."""
    def attend(q, k, v):
        with sdpa_kernel([SDPA_KERNELS[kernel]]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return attend


def registry(name):
    backend = get_attention(name)
    return lambda q, k, v: backend.attend(q, k, v, None)


def reference(q, k, v, kv_lens=None):
    mask = None if kv_lens is None else _key_mask(kv_lens, k.shape[1])
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median")


def kernels_run(fn):
    """Names of the device kernels one call launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:80] for e in prof.events() if e.device_type == DeviceType.CUDA})


def checks() -> dict:
    """Graph capture of the registry's sdpa at an unseen shape, with no warm-up; masked calls."""
    out = {}
    attend = get_attention("sdpa").attend
    q, k, v = inputs(1, 12, "self", lq=1000, lk=3000, seed=7)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static = attend(q, k, v, None)
        g.replay()
        torch.cuda.synchronize()
        out["graph_capture"] = dict(ok=True, err_vs_fp32=round(rel(static, reference(q, k, v)), 5),
                                    kernels=kernels_run(lambda: g.replay()))
    except Exception as exc:  # noqa: BLE001 - the finding is the error
        out["graph_capture"] = dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    # what the graph executors do: the key's first call eager (cuDNN builds its plan), the second captured
    q, k, v = inputs(1, 12, "self", lq=1560, lk=9360, seed=9)
    flash = get_attention("sdpa_flash").attend
    try:
        attend(q, k, v, None)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static = attend(q, k, v, None)
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2):
            flash(q, k, v, None)
        g.replay()
        torch.cuda.synchronize()
        out["graph_capture_after_eager_cudnn"] = dict(ok=True, err_vs_fp32=round(rel(static, reference(q, k, v)), 5),
                                                      kernels=kernels_run(lambda: g.replay()),
                                                      replay_ms=round(time_ms(lambda: g.replay()), 4),
                                                      eager_ms=round(time_ms(lambda: attend(q, k, v, None)), 4),
                                                      flash_replay_ms=round(time_ms(lambda: g2.replay()), 4))
    except Exception as exc:  # noqa: BLE001
        out["graph_capture_after_eager_cudnn"] = dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    q, k, v = inputs(3, 12, "self", lk=4680, seed=8)
    lens = torch.tensor([4680, 3120, 1560], device="cuda")
    try:
        o = attend(q, k, v, lens)
        out["masked"] = dict(ok=True, err_vs_fp32=round(rel(o, reference(q, k, v, lens)), 5),
                             kernels=kernels_run(lambda: attend(q, k, v, lens)))
    except Exception as exc:  # noqa: BLE001
        out["masked"] = dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3B,14B")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--flex-rows", default="1,4", help="flex compiles once per shape: fewer rows")
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--checks", action="store_true", help="only the graph-capture and masked checks")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                sdpa_cuda_order=list(SDPA_CUDA_ORDER))
    if a.checks:
        meta["checks"] = checks()
        print(json.dumps(meta, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(meta, indent=1))
        return
    rows_list = [int(r) for r in a.rows.split(",")]
    flex_rows = {int(r) for r in a.flex_rows.split(",")}
    results = []

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(dict(meta, results=results), indent=1))

    print(f"# {meta}", flush=True)
    candidates = {"flash": pinned("flash"), "cudnn": pinned("cudnn"), "efficient": pinned("efficient"),
                  "sdpa": registry("sdpa")}
    try:
        candidates["fa4"] = registry("fa4")
    except RuntimeError as exc:
        meta["fa4"] = str(exc)
    jobs = [(m, kind, r, name) for m in a.models.split(",") for kind in KEYS for r in rows_list for name in candidates]
    jobs += [(m, kind, r, "flex") for m in a.models.split(",") for kind in KEYS for r in rows_list
             if r in flex_rows and (kind == "self" or r == min(flex_rows))]
    refs = {}
    for model, kind, rows, name in jobs:
        if time.monotonic() - T0 > a.budget_s:
            results.append(dict(model=model, kind=kind, rows=rows, backend=name, skipped="budget"))
            continue
        heads = HEADS[model]
        q, k, v = inputs(rows, heads, kind)
        fn = candidates[name] if name != "flex" else registry("flex")
        row = dict(model=model, kind=kind, rows=rows, backend=name, lq=LQ, lk=KEYS[kind], heads=heads)
        try:
            t = time.monotonic()
            out = fn(q, k, v)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.monotonic() - t, 2)
            if rows == 1:
                key = (model, kind)
                if key not in refs:
                    refs[key] = reference(q, k, v)
                row["err_vs_fp32"] = round(rel(out, refs[key]), 5)
            ms = time_ms(lambda: fn(q, k, v))
            row.update(ms=round(ms, 4), tflops=round(4 * rows * heads * LQ * KEYS[kind] * D / ms / 1e9, 1))
            if name == "sdpa" and rows == 1:
                row["kernels"] = kernels_run(lambda: fn(q, k, v))
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run a shape is a finding
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        results.append(row)
        print(json.dumps(row), flush=True)
        save()
        del q, k, v
    print(table(results), flush=True)
    save()


def table(results) -> str:
    names = []
    for r in results:
        if r["backend"] not in names:
            names.append(r["backend"])
    lines = ["| model | attention | rows | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    keys = []
    for r in results:
        if (r["model"], r["kind"], r["rows"]) not in keys:
            keys.append((r["model"], r["kind"], r["rows"]))
    for key in keys:
        cells = []
        for n in names:
            r = next((r for r in results if (r["model"], r["kind"], r["rows"]) == key and r["backend"] == n), None)
            cells.append("" if r is None else "skipped" if "skipped" in r else "error" if "error" in r
                         else f"{r['ms']:.3f} ({r['tflops']:.0f})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
