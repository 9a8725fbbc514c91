"""``pipe`` mode: the one-GPU measurements the predictor needs, pipe with one stage against single, and pipe on
N GPUs when there are N (dummy weights: timings are real, outputs are noise).

    python experiments/bench_pipe.py --json experiments/results/bench_pipe_h200.json        # one GPU
    python experiments/bench_pipe.py --gpus 2,4 --json out.json                             # + pipe on 2 and 4
    python -m sdv2_lab.parallel.predict --from out.json                                     # the table again
    python experiments/bench_pipe.py --device cpu --models tiny --height 64 --width 96 --frames 25 --vae wan_tiny

Sections (each writes the JSON as it finishes; a failing one is reported and the others still run), in this
order: blocks of the first model, vae, equality, blocks of the other models, gpus. One H200: about 1.5 min
(give it 180 s; a shorter limit still leaves the sections done).

1. **blocks**: per model (1.3B, 14B at 480x832), the DiT job of ONE stream-batch row (what a pipe stage runs
   per unit: a job of n steps is n such units) with a full KV cache, replayed from a CUDA graph as the stages run
   their units (``--eager-stages``: eager, host-bound at ~3 ms a block), for a model
   cut to 2 and to 6 blocks of the real width: per block = (T6 - T2) / 4, embed + head + x0 = T2 - 2 per block;
   activation bytes per unit = F x S x D x 2. Also the whole n-row job (what one stage runs when W = 1).
2. **vae**: steady-state encode and decode of one 4-frame chunk (the configured VAE, its production path).
3. **equality**: the whole pipeline streamed, ``mode=pipe num_gpus=1`` against ``mode=single`` with the
   same settings (CUDA graphs unless ``--eager-stages``, no overlap), twice each, alternating; mean steady-state
   FPS; PASS within 5%.
4. **gpus** (when that many GPUs are visible): ``mode=pipe num_gpus=N`` streamed (one process per GPU,
   NCCL), measured FPS, per-rank stage times, bubble, split; link bandwidth measured GPU 0 -> 1.

Then the predictor's table (sdv2_lab/parallel/predict.py) from these numbers, beside what was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdv2_lab.build import backbone_config, build_pipeline, compose_config  # noqa: E402
from sdv2_lab.parallel.predict import OneGPU, predict, table  # noqa: E402

MODELS = {"1.3B": "wan_1_3b", "14B": "wan_14b", "tiny": "tiny"}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int = 2) -> float:
    """Median ms of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ms = []
    for _ in range(iters):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t0))
    return sorted(ms)[len(ms) // 2]


# ---------------------------------------------------------------------------------------------- 1. blocks
def bench_blocks(model: str, a) -> dict:
    import bench_dit
    from dataclasses import replace
    bench_dit.clock = __import__("sdv2_lab.stream.timing", fromlist=["Clock"]).Clock(a.device)
    cfg = compose_config("config", [f"backbone={MODELS[model]}", f"attention={a.attention}"])
    full = backbone_config(cfg)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    common = dict(height=a.height, width=a.width, device=torch.device(a.device), dtype=dtype, warmup=3,
                  iters=a.iters, num_kv=6, sink=3, threshold=0.2, graph=not a.eager_stages)
    t = {}
    for k in (2, 6):
        part = replace(full, name=f"{full.name}-{k}", num_layers=k)
        t[k] = bench_dit.bench_one(part, 1, **common)["step_ms"]                 # one row: a pipe unit
    block = (t[6] - t[2]) / 4
    job6 = bench_dit.bench_one(replace(full, name=f"{full.name}-6", num_layers=6), a.steps, **common)["step_ms"]
    S = (a.height // 16) * (a.width // 16)
    out = dict(model=model, layers=full.num_layers, dim=full.dim, steps=a.steps, unit_step_ms_2_blocks=t[2],
               unit_step_ms_6_blocks=t[6], block_ms_per_unit=round(block, 4),
               embed_head_ms_per_unit=round(t[2] - 2 * block, 4),
               block_ms_per_job=round(block * a.steps, 4),                       # n units per job (W > 1)
               block_ms_batched_job=round((job6 - (t[2] - 2 * block)) / 6, 4),   # the whole job at once (W = 1)
               act_bytes_per_unit=S * full.dim * (2 if dtype == torch.bfloat16 else 4),
               predicted_single_stage_dit_ms=round(full.num_layers * block * a.steps + (t[2] - 2 * block) * a.steps, 3))
    return out


# ---------------------------------------------------------------------------------------------- 2. vae
def bench_vae(a) -> dict:
    from sdv2_lab.build import build_vae, resolve_dtype
    cfg = compose_config("config", [f"vae={a.vae}", f"device={a.device}", f"height={a.height}", f"width={a.width}"])
    device = torch.device(a.device)
    dtype = resolve_dtype(cfg.dtype, device)
    vae = build_vae(cfg, device, dtype)
    if hasattr(vae, "warmup") and device.type == "cuda":
        vae.warmup(a.height, a.width)
    st = vae.new_state(1)
    first = torch.zeros(1, 3, 5, a.height, a.width, device=device, dtype=dtype)
    chunk = torch.rand(1, 3, 4, a.height, a.width, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        z = vae.encode(st, first)
        vae.decode(st, z)
        z1 = vae.encode(st, chunk)
        enc = timed(lambda: vae.encode(st, chunk), device, a.iters)
        dec = timed(lambda: vae.decode(st, z1), device, a.iters)
    return dict(vae=cfg.vae.name, vae_config=a.vae, encode_ms=round(enc, 3), decode_ms=round(dec, 3),
                encode_fps=round(4e3 / enc, 1), decode_fps=round(4e3 / dec, 1))


# ---------------------------------------------------------------------------------------------- 3. equality
def stream(cfg_overrides: list[str], a) -> dict:
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.stream.clips import stream_clip
    cfg = compose_config("config", cfg_overrides)
    pipe = build_pipeline(cfg)
    clip, _ = synthetic_clip(a.frames, a.height, a.width, seed=1)
    clip = clip.to(pipe.device)
    stream_clip(pipe, clip[:, : 1 + 4 * 10], "warm-up", keep_output=False)
    sync(a.device)
    _, stats = stream_clip(pipe, clip, "a watercolor street", keep_output=False, seed=0)
    del pipe
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return stats


def bench_equality(a) -> dict:
    """single, pipe, single, pipe (drift in the machine cancels in the means)."""
    base = [f"backbone={MODELS[a.equality_model]}", f"steps={a.steps}", f"device={a.device}", f"height={a.height}",
            f"width={a.width}", f"vae={a.vae}", f"cuda_graph={str(not a.eager_stages).lower()}", "overlap=false"]
    keys = ("steady_fps", "e2e_fps", "dit_fps", "encode_fps", "decode_fps", "ttff_s")
    runs = {"single": [], "pipe_1": []}
    for name, ov in (("single", ["mode=single"]), ("pipe_1", ["mode=pipe", "num_gpus=1"])) * 2:
        s = stream(base + ov, a)
        runs[name].append({k: round(v, 3) for k, v in s.items() if isinstance(v, float) and k in keys})
    out = {name: {k: round(sum(r[k] for r in rs) / len(rs), 3) for k in rs[0]} for name, rs in runs.items()}
    out["runs"] = runs
    ratio = out["pipe_1"]["steady_fps"] / out["single"]["steady_fps"]
    out.update(model=a.equality_model, ratio_pipe1_to_single=round(ratio, 4),
               verdict="PASS" if abs(ratio - 1) <= 0.05 else "FAIL")
    return out


# ---------------------------------------------------------------------------------------------- 4. several GPUs
def link_gbps(mb: int = 256) -> float:
    """GPU 0 -> GPU 1 copy bandwidth (GB/s)."""
    x = torch.empty(mb * 2 ** 20, dtype=torch.uint8, device="cuda:0")
    y = torch.empty_like(x, device="cuda:1")
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return 10 * x.numel() / (time.perf_counter() - t0) / 1e9


def pipe_rank(container: dict, frames: int) -> dict:
    from omegaconf import OmegaConf
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.parallel.context import current
    from sdv2_lab.stream.clips import stream_clip
    cfg = OmegaConf.create(container)
    cfg.device = str(current().device)
    pipe = build_pipeline(cfg)
    clip, _ = synthetic_clip(frames, cfg.height, cfg.width, seed=1)
    stream_clip(pipe, clip[:, : 1 + 4 * 12], "warm-up", keep_output=False)
    _, stats = stream_clip(pipe, clip, "a watercolor street", keep_output=False, seed=0)
    return stats


def bench_gpus(model: str, gpus: int, a, vae_blocks=None, schedule: bool = False) -> dict:
    from omegaconf import OmegaConf
    from sdv2_lab.parallel.launch import launch
    gpu = a.device.startswith("cuda")
    ov = [f"backbone={MODELS[model]}", f"steps={a.steps}", f"device={'cuda' if gpu else 'cpu'}", f"height={a.height}",
          f"width={a.width}", f"vae={a.vae}", "mode=pipe", f"num_gpus={gpus}", f"mode.schedule_block={str(schedule).lower()}",
          f"cuda_graph={str(not a.eager_stages).lower()}",
          "output.dir=/tmp"]
    if vae_blocks:
        ov.append(f"mode.vae_blocks=[{vae_blocks[0]:.3f},{vae_blocks[1]:.3f}]")
    cfg = compose_config("config", ov)
    stats = launch(pipe_rank, (OmegaConf.to_container(cfg, resolve=True), a.frames),
                   devices=[f"cuda:{i}" if gpu else "cpu" for i in range(gpus)], timeout_s=120)[-1]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()
            if k.startswith("pipe_") or k in ("steady_fps", "e2e_fps", "ttff_s", "latency_p95_ms")}


# ---------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3B,14B")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--vae", default="wan")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--frames", type=int, default=65, help="frames streamed in the equality and multi-GPU runs")
    p.add_argument("--equality-model", default=None, help="default: the first of --models")
    p.add_argument("--skip", default="", help="sections to skip: blocks,vae,equality,gpus")
    p.add_argument("--gpus", default="2,4,8", help="pipe stage counts to run when that many GPUs are visible")
    p.add_argument("--schedule-block", default="off", choices=["off", "on", "both"],
                   help="multi-GPU runs with the block scheduler off, on, or each")
    p.add_argument("--eager-stages", action="store_true", help="stages without CUDA graphs (times and runs)")
    p.add_argument("--link-gbps", type=float, default=None, help="assumed GPU-GPU bandwidth when not measured")
    p.add_argument("--cpu-ranks", type=int, default=0, help="--device cpu: run the gpus section on up to this "
                   "many CPU processes (a smoke test of this script)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    a.equality_model = a.equality_model or a.models.split(",")[0]
    torch.backends.cudnn.benchmark = True
    skip = set(filter(None, a.skip.split(",")))
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    res = dict(gpu=gpu, gpus_visible=torch.cuda.device_count(), torch=torch.__version__, height=a.height,
               width=a.width, steps=a.steps, vae=a.vae, weights="dummy", blocks={}, errors={})

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1))

    def section(name, fn):
        t0 = time.time()
        try:
            out = fn()
            print(f"[{name}: {time.time() - t0:.1f} s] {json.dumps(out)}", flush=True)
            return out
        except Exception as exc:  # noqa: BLE001 -- one failing section must not cost the others
            traceback.print_exc()
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            save()

    models = [m for m in a.models.split(",") if m]

    def blocks(ms):
        for m in ms:
            if "blocks" not in skip:
                got = section(f"blocks {m}", lambda m=m: bench_blocks(m, a))
                if got:
                    res["blocks"][m] = got

    blocks(models[:1])   # the cheapest first: a short time limit still leaves a usable JSON
    if "vae" not in skip:
        res["vae_times"] = section("vae", lambda: bench_vae(a))
    if "equality" not in skip:
        res["equality"] = section("equality", lambda: bench_equality(a))
    blocks(models[1:])
    visible = torch.cuda.device_count() if a.device.startswith("cuda") else a.cpu_ranks
    link = a.link_gbps
    if visible >= 2 and "gpus" not in skip and a.device.startswith("cuda"):
        link = section("link", lambda: round(link_gbps(), 1)) or link
        res["link_gbps_measured"] = link
    res["measured"] = {}
    vae = res.get("vae_times") or {}
    res["models"] = []
    for m in models:
        b = res["blocks"].get(m)
        if not b:
            continue
        one = OneGPU(layers=b["layers"], steps=a.steps, block_ms=b["block_ms_per_job"],
                     batched_block_ms=b["block_ms_batched_job"],
                     encode_ms=vae.get("encode_ms", 0.0), decode_ms=vae.get("decode_ms", 0.0),
                     embed_ms=0.5 * max(0.0, b["embed_head_ms_per_unit"]) * a.steps,
                     head_ms=0.5 * max(0.0, b["embed_head_ms_per_unit"]) * a.steps,
                     act_bytes=b["act_bytes_per_unit"], link_gbps=link or 200.0)
        measured = {}
        if res.get("equality") and m == a.equality_model:
            measured[1] = res["equality"]["pipe_1"]["steady_fps"]
        for g in [int(x) for x in a.gpus.split(",") if x]:
            if "gpus" in skip or g > visible:
                continue
            vb = (one.encode_ms / one.block_ms, one.decode_ms / one.block_ms) if one.block_ms > 0 else None
            for sched in {"off": [False], "on": [True], "both": [False, True]}[a.schedule_block]:
                name = f"{m} x{g}" + (" block scheduler" if sched else "")
                got = section(f"pipe {name}", lambda g=g, sched=sched: bench_gpus(m, g, a, vb, sched))
                if got:
                    res["measured"][name] = dict(got, gpus=g, model=m, steps=a.steps, schedule_block=sched)
                    measured[g] = max(measured.get(g) or 0.0, got.get("steady_fps") or 0.0)
        entry = dict(model=m, vae=vae.get("vae", a.vae), predictor=one.__dict__, measured_fps=measured,
                     predicted_fps={g: round(predict(one, g).fps, 2) for g in (1, 2, 4, 8) if g <= one.layers})
        res["models"].append(entry)
        print()
        print(table(f"{m} / {a.steps} step(s) / {entry['vae']} ({gpu}; link "
                    f"{'measured' if res.get('link_gbps_measured') else 'assumed'} {one.link_gbps:g} GB/s)",
                    one, measured=measured))
    eq = res.get("equality")
    if eq:
        print(f"\npipe with 1 stage vs single ({eq['model']}, {a.steps} steps, "
              f"{'eager' if a.eager_stages else 'CUDA graphs'}; runs single, pipe, single, pipe):"
              f" steady FPS {eq['pipe_1']['steady_fps']:.2f} vs {eq['single']['steady_fps']:.2f} -> ratio "
              f"{eq['ratio_pipe1_to_single']:.3f}: {eq['verdict']} (within 5%)")
    save()
    if res["errors"]:
        print("errors:", json.dumps(res["errors"], indent=1))


if __name__ == "__main__":
    main()
