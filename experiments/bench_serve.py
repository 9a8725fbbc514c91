"""`sdv2 serve` under load: N scripted WebSocket clients at once (no browser), each sending synthetic JPEG frames at
16 FPS; per client: output FPS, latency from sending a frame to receiving its restyled frame (the client's own
clock, via the tag the server echoes), dropped frames. Self-contained: the server runs in this process (uvicorn
in a thread, a free loopback port), the clients in a second process (so they do not share this one's GIL).

    # GPU, the 1.3B model (dummy weights unless weights=real ...): clients 1, 2, 4, 8
    python experiments/bench_serve.py --clients 1,2,4,8 --seconds 30 -- \\
        backbone=wan_1_3b device=cuda height=480 width=832 vae=taehv steps=1
    # CPU smoke run
    python experiments/bench_serve.py --clients 1,2 --seconds 10 -- height=32 width=48

Everything after ``--`` is a Hydra override of conf/serve.yaml (model, VAE, steps, serve.*). Prints a markdown
table and writes JSON (--out). Latency and FPS leave out each client's first --warmup seconds of output.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def client_process(url: str, n: int, seconds: float, fps: float, height: int, width: int, steps, warmup: float,
                   queue) -> None:
    """N clients at once (one asyncio loop); their summaries back through ``queue``."""
    from sdv2_lab.serve.client import run_client, synthetic_jpegs

    frames = synthetic_jpegs(32, height, width)

    async def main():
        return await asyncio.gather(*[
            run_client(url, seconds=seconds, fps=fps, height=height, width=width, name=f"c{i}", seed=i,
                       steps=steps, frames=frames, drain_s=3.0) for i in range(n)], return_exceptions=True)

    results = asyncio.run(main())
    queue.put([{"client": f"c{i}", "exception": repr(r)} if isinstance(r, BaseException) else r.summary(warmup)
               for i, r in enumerate(results)])


def run_round(url: str, n: int, a, height: int, width: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=client_process, args=(url, n, a.seconds, a.fps, height, width, a.steps, a.warmup, q))
    p.start()
    try:
        rows = q.get(timeout=a.seconds + 600)
    finally:
        p.join(timeout=30)
    return rows


def wait_idle(base: str, timeout: float = 60.0) -> None:
    import httpx
    t0 = time.monotonic()
    while (h := httpx.get(base + "/api/health").json())["streams"] or h["connections"]:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"streams still open {timeout} s after the clients left: {h}")
        time.sleep(0.1)


def summarise(n: int, rows: list[dict], engine: dict) -> dict:
    ok = [r for r in rows if "exception" not in r and r["started"] and not r["busy"]]
    fps = [r["fps_out"] for r in ok]
    p50 = [r["latency_p50_ms"] for r in ok if r["latency_p50_ms"] is not None]
    p95 = [r["latency_p95_ms"] for r in ok if r["latency_p95_ms"] is not None]
    drops = {k: sum(r["dropped"].get(k, 0) for r in ok) for k in ("throttled", "stale", "output")}
    sent = sum(r["sent"] for r in ok)
    return {"clients": n, "served": len(ok), "errors": sum(r.get("errors", 0) for r in ok) + len(rows) - len(ok),
            "fps_per_client_mean": round(statistics.mean(fps), 2) if fps else 0.0,
            "fps_per_client_min": round(min(fps), 2) if fps else 0.0, "fps_total": round(sum(fps), 2),
            "latency_p50_ms": round(statistics.median(p50), 1) if p50 else None,
            "latency_p95_ms_mean": round(statistics.mean(p95), 1) if p95 else None,
            "latency_p95_ms_worst": round(max(p95), 1) if p95 else None,
            "dropped": drops, "dropped_pct": round(100 * sum(drops.values()) / sent, 1) if sent else 0.0,
            "step_ms_p50": engine.get("step_ms_p50"), "step_ms_p95": engine.get("step_ms_p95"),
            "streams_per_step_mean": engine.get("streams_per_step_mean"), "per_client": rows}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,2,4,8", help="client counts, comma separated (one round each)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each client sends")
    p.add_argument("--fps", type=float, default=16.0, help="each client's send rate")
    p.add_argument("--steps", type=int, default=None, help="the clients' steps (default: the config's)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of each client's output left out")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench_serve" / "bench_serve.json"))
    a = p.parse_args(argv)
    counts = [int(c) for c in a.clients.split(",")]

    import httpx
    import torch

    from sdv2_lab.build import compose_config
    from sdv2_lab.serve.background import serve_in_thread
    from sdv2_lab.serve.engine import Engine
    from sdv2_lab.serve.settings import ServeSettings

    cfg = compose_config("serve", [*overrides, f"serve.max_streams={max(counts)}"])
    settings = ServeSettings.from_config(cfg.serve)
    settings.port, settings.log_level = 0, "warning"
    t0 = time.perf_counter()
    engine = Engine(cfg, settings)
    build_s = time.perf_counter() - t0
    info = engine.describe()
    t0 = time.perf_counter()
    if settings.warmup is True or (settings.warmup == "auto" and engine.pipe.device.type == "cuda"):
        engine.warmup()
    warmup_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name() if engine.pipe.device.type == "cuda" else platform.processor() or "cpu"
    print(f"bench_serve: {info['model']} / vae {info['vae']} / {info['default_steps']} step(s) / "
          f"{info['width']}x{info['height']} on {info['device']} ({gpu}), weights {info['weights']}; "
          f"build {build_s:.1f} s, warm-up {warmup_s:.1f} s; overrides {overrides}", flush=True)
    results = []
    with serve_in_thread(engine, settings) as base:
        url = base.replace("http://", "ws://") + "/ws"
        for n in counts:
            engine.step_ms.clear()
            engine.batch_sizes.clear()
            rows = run_round(url, n, a, engine.height, engine.width)
            wait_idle(base)
            results.append(summarise(n, rows, engine.stats()))
            r = results[-1]
            print(f"  {n} client(s): {r['fps_per_client_mean']} FPS each, p95 {r['latency_p95_ms_mean']} ms, "
                  f"dropped {r['dropped_pct']}%, step p50 {r['step_ms_p50']} ms", flush=True)
        metrics = httpx.get(base + "/api/metrics").json()

    print(f"\n{info['model']}, {info['width']}x{info['height']}, vae {info['vae']}, "
          f"{a.steps or info['default_steps']} step(s), {info['device']} ({gpu}), weights {info['weights']}, "
          f"clients send {a.fps:g} FPS for {a.seconds:g} s\n")
    print("| clients | served | FPS per client (mean / min) | total FPS | latency p50 ms | p95 ms (mean / worst) "
          "| dropped % (stale / throttled / output) | engine step ms p50 | streams per step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        d = r["dropped"]
        print(f"| {r['clients']} | {r['served']} | {r['fps_per_client_mean']} / {r['fps_per_client_min']} | "
              f"{r['fps_total']} | {r['latency_p50_ms']} | {r['latency_p95_ms_mean']} / {r['latency_p95_ms_worst']} | "
              f"{r['dropped_pct']} ({d['stale']} / {d['throttled']} / {d['output']}) | {r['step_ms_p50']} | "
              f"{r['streams_per_step_mean']} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": info, "device": gpu, "overrides": overrides, "seconds": a.seconds,
                               "fps_in": a.fps, "build_s": build_s, "warmup_s": warmup_s, "rounds": results,
                               "server_totals": metrics["totals"], "torch": torch.__version__}, indent=1))
    print(f"\nwrote {out}")
    engine.shutdown()


if __name__ == "__main__":
    main()
