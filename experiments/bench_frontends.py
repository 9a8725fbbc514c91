"""Every way a user runs it, on one configuration, in one GPU call: the engine (the benchmark's number), the seed's
staged loop as its README writes it, ``sdv2 run``, ``run_v2v.sh`` and ``sdv2 serve`` with one scripted client.
Prints FPS (end to end and steady state), TTFF, per-chunk latency p50 / p95 and each path's ratio to the engine.

    python experiments/bench_frontends.py --out $OUT                      # GPU: 1.3B, 1 step, Wan VAE, 480x832
    python experiments/bench_frontends.py --cpu --out /tmp/fe              # a CPU smoke run (tiny model)

Every path uses the defaults a user gets (no speed flags: the fast paths are ``auto``); the same input: a
``--frames``-frame mp4 written first. The engine and the staged loop run in this process (the staged loop with a
pipeline of its own, built after the engine's is freed); ``sdv2 run``, ``run_v2v.sh`` and ``sdv2 serve`` run as
the user starts them, in subprocesses, and report through their own timings (``timings.json``; the serve client's
clock). Start-up (build, warm-up) is reported apart. Weights are DUMMY on every path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

PROMPT = "a dog walks on the grass, realistic"


def config(a) -> list[str]:
    if a.cpu:
        return ["device=cpu", f"height={a.height}", f"width={a.width}", f"steps={a.steps}"]
    return ["backbone=wan_1_3b", f"vae={a.vae}", f"steps={a.steps}", f"height={a.height}", f"width={a.width}",
            "device=cuda"]


def summary(stats: dict) -> dict:
    keys = ("e2e_fps", "steady_fps", "ttff_s", "latency_p50_ms", "latency_p95_ms", "encode_fps", "dit_fps",
            "decode_fps", "warmup_s", "output_frames", "writer_waits")
    return {k: stats.get(k) for k in keys if k in stats}


def percentile(values, q):
    from sdv2_lab.stream.timing import percentile as p
    return p(values, q) if values else None


# ---------------------------------------------------------------------------------------------- in process
def engine(a, clip_path: Path) -> dict:
    import torch

    from sdv2_lab.build import build_pipeline, compose_config
    from sdv2_lab.io.video import load_video
    from sdv2_lab.stream.clips import stream_clips
    t0 = time.perf_counter()
    pipe = build_pipeline(compose_config("config", config(a)), announce=print)
    startup = time.perf_counter() - t0
    clip = load_video(clip_path, height=a.height, width=a.width).to(pipe.device)
    rows = [stream_clips(pipe, [clip], [PROMPT], seeds=[0]).per_stream[0] for _ in range(a.repeats)]
    best = max(rows, key=lambda r: r.get("e2e_fps") or 0)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**summary(best), "startup_s": round(startup, 2), "repeats_e2e_fps": [r.get("e2e_fps") for r in rows]}


def staged_loop(a, clip_path: Path) -> dict:
    """The seed README's loop, verbatim in its calls (the CPU video as load_video returns it), timed on the host:
    a chunk's latency runs from its encode_chunk call to the return of the decode_chunk that holds it."""
    import numpy as np
    import torch

    from sdv2_lab import StreamDiffusionV2Pipeline, load_video
    t0 = time.perf_counter()
    stream = StreamDiffusionV2Pipeline(None, mode="single", height=a.height, width=a.width, step=a.steps,
                                       device="cpu" if a.cpu else "cuda",
                                       overrides=[] if a.cpu else ["backbone=wan_1_3b", f"vae={a.vae}"])
    startup = time.perf_counter() - t0
    video = load_video(clip_path, height=a.height, width=a.width)
    results = []
    executor = stream.pipeline.driver.executor
    for _ in range(a.repeats):
        stream.prepare(PROMPT)
        graphs0 = (getattr(executor, "captures", None), getattr(executor, "replays", None))
        decoded_chunks, noise_scale = [], stream.noise_scale
        starts, outs = [], []                                 # host clock: chunk k's encode call, output times
        calls = {"encode": [], "denoise": [], "decode": []}   # host ms inside each call (decode: the wait too)
        t_start = time.perf_counter()
        for video_chunk in stream.chunk_video(video):
            starts.append(time.perf_counter())
            encoded_chunk = stream.encode_chunk(video, video_chunk, previous_noise_scale=noise_scale,
                                                initial_noise_scale=stream.noise_scale)
            noise_scale = encoded_chunk.noise_scale
            t1 = time.perf_counter()
            denoised_chunk = stream.denoise_chunk(encoded_chunk)
            t2 = time.perf_counter()
            calls["encode"].append(1e3 * (t1 - starts[-1]))
            calls["denoise"].append(1e3 * (t2 - t1))
            if denoised_chunk is None:
                continue
            decoded_chunks.append(stream.decode_chunk(denoised_chunk))
            outs.append((time.perf_counter(), decoded_chunks[-1].shape[0]))
            calls["decode"].append(1e3 * (outs[-1][0] - t2))
        for frames in stream.flush():
            decoded_chunks.append(frames)
            outs.append((time.perf_counter(), frames.shape[0]))
        t_end = time.perf_counter()
        n = int(sum(f for _, f in outs))
        warm = a.steps                                        # the first chunk and the stream batch filling
        steady = outs[warm:]
        steady_fps = sum(f for _, f in steady) / (steady[-1][0] - outs[warm - 1][0]) if len(steady) > 1 else None
        lat = [1e3 * (t - s) for (t, _), s in zip(outs, starts)]   # outputs come out in chunk order
        results.append({"e2e_fps": n / (t_end - t_start), "steady_fps": steady_fps,
                        "ttff_s": outs[0][0] - t_start + 5 / 16, "latency_p50_ms": percentile(lat, 50),
                        "latency_p95_ms": percentile(lat, 95), "output_frames": n,
                        # where the time goes, chunk by chunk, and whether this stream captured graphs anew
                        "latencies_ms": [round(v, 1) for v in lat],
                        "call_ms_p50": {k: percentile(v[1:], 50) for k, v in calls.items()},
                        "graph_captures": None if graphs0[0] is None else executor.captures - graphs0[0],
                        "graph_replays": None if graphs0[1] is None else executor.replays - graphs0[1]})
        assert np.concatenate(decoded_chunks).shape[0] == n
    # the same frames as the engine? (same pipeline, same seed; overlap and graphs as the defaults set them)
    from sdv2_lab.stream.clips import stream_clip
    torch.manual_seed(1)
    engine_out, _ = stream_clip(stream.pipeline, video, PROMPT)
    torch.manual_seed(1)
    stream.prepare(PROMPT)
    staged, noise_scale = [], stream.noise_scale
    for video_chunk in stream.chunk_video(video):
        encoded_chunk = stream.encode_chunk(video, video_chunk, previous_noise_scale=noise_scale,
                                            initial_noise_scale=stream.noise_scale)
        noise_scale = encoded_chunk.noise_scale
        denoised_chunk = stream.denoise_chunk(encoded_chunk)
        if denoised_chunk is not None:
            staged.append(stream.decode_chunk(denoised_chunk))
    staged = np.concatenate(staged + stream.flush())
    diff = float(np.abs(staged - engine_out.numpy()).max())
    stream.close()
    best = max(results, key=lambda r: r["e2e_fps"])
    best["staged_vs_engine_max_abs"] = diff
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**best, "startup_s": round(startup, 2), "repeats_e2e_fps": [round(r["e2e_fps"], 2) for r in results]}


# ---------------------------------------------------------------------------------------------- as users start them
def subprocess_run(cmd: list[str], timings: Path, log: Path, timeout: int) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0 or not timings.is_file():
        # the log's last lines on stdout too: a device call's machine (and its files) may be gone before it is read
        tail = log.read_text()[-4000:]
        print(f"=== {log.name} (exit {res.returncode}), its end:\n{tail}", flush=True)
        return {"error": f"exit {res.returncode}: " + tail[-600:]}
    stats = json.loads(timings.read_text())
    return {**summary(stats), "wall_s": round(wall, 2)}


def sdv2_run(a, clip_path: Path, out: Path) -> dict:
    d = out / "sdv2_run"
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "run", *config(a), "input=file", f"input.video={clip_path}",
           f"input.prompt='{PROMPT}'", f"output.dir={d}"]
    return subprocess_run(cmd, d / "timings.json", out / "sdv2_run.log", a.timeout)


def run_v2v(a, clip_path: Path, out: Path) -> dict:
    d = out / "run_v2v"
    d.mkdir(parents=True, exist_ok=True)
    prompt = d / "prompt.txt"
    prompt.write_text(PROMPT + "\n")
    model = [] if a.cpu else ["backbone=wan_1_3b", f"vae={a.vae}"]
    cmd = ["bash", str(ROOT / "run_v2v.sh"), "single", "--video_path", str(clip_path), "--prompt_file_path",
           str(prompt), "--output_folder", str(d), "--step", str(a.steps), "--height", str(a.height), "--width",
           str(a.width), "--device", "cpu" if a.cpu else "cuda", *model, f"output.timings={d / 'timings.json'}"]
    return subprocess_run(cmd, d / "timings.json", out / "run_v2v.log", a.timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(a, out: Path) -> dict:
    """``sdv2 serve`` in a subprocess, one scripted client sending frames faster than the engine takes them."""
    import urllib.request

    from sdv2_lab.serve.client import run_client, synthetic_jpegs
    port = free_port()
    log = open(out / "serve.log", "w")
    fps_in = 4 * a.client_fps
    # the same configuration: one stream slot of the benchmark's step count (the KV rows and warm-up it needs)
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "serve", *config(a), f"serve.port={port}",
           f"serve.input_fps={fps_in}", "serve.max_streams=1", f"serve.max_steps={a.steps}",
           f"hydra.run.dir={out / 'serve_run'}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > a.timeout:
                    return {"error": "the server did not start: " + (out / "serve.log").read_text()[-600:]}
                time.sleep(1)
        startup = time.perf_counter() - t0
        frames = synthetic_jpegs(32, a.height, a.width)
        res = asyncio.run(run_client(f"ws://127.0.0.1:{port}/ws", seconds=a.serve_seconds, fps=a.client_fps,
                                     height=a.height, width=a.width, steps=a.steps, frames=frames, drain_s=3.0))
        s = res.summary(warmup_s=a.serve_warmup)
        return {"e2e_fps": s["fps_out"], "steady_fps": s["fps_out"], "ttff_s": s["first_output_s"],
                "latency_p50_ms": s["latency_p50_ms"], "latency_p95_ms": s["latency_p95_ms"],
                "output_frames": s["received"], "sent": s["sent"], "dropped": s["dropped_total"],
                "startup_s": round(startup, 2), "client_fps": a.client_fps}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="a smoke run on the CPU (tiny model, 32x48)")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--vae", default="wan")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="in-process paths: streams after the build (best kept)")
    p.add_argument("--paths", default="serve,engine,staged,sdv2_run,run_v2v")
    p.add_argument("--client-fps", type=float, default=60.0, help="serve: the client's send rate")
    p.add_argument("--serve-seconds", type=float, default=20.0)
    p.add_argument("--serve-warmup", type=float, default=3.0, help="serve: seconds of output left out")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_frontends"))
    a = p.parse_args()
    a.height = a.height or (32 if a.cpu else 480)
    a.width = a.width or (48 if a.cpu else 832)
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    from sdv2_lab.io.synthetic import write_synthetic_clip
    clip = a.out / "clip.mp4"
    write_synthetic_clip(clip, frames=a.frames, height=a.height, width=a.width)
    runs = {"engine": lambda: engine(a, clip), "staged": lambda: staged_loop(a, clip),
            "sdv2_run": lambda: sdv2_run(a, clip, a.out), "run_v2v": lambda: run_v2v(a, clip, a.out),
            "serve": lambda: serve(a, a.out)}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.cpu else "cpu"
    rows = {}
    for name in a.paths.split(","):
        t0 = time.perf_counter()
        try:
            rows[name] = runs[name]()
        except Exception as exc:  # noqa: BLE001 -- one path failing must not lose the others' numbers
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        rows[name]["bench_s"] = round(time.perf_counter() - t0, 1)
        print(f"=== {name}: {json.dumps(rows[name], default=str)}", flush=True)
        (a.out / "frontends.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__,
                                                          "config": config(a), "frames": a.frames,
                                                          "rows": rows}, indent=1, default=str))
    base = rows.get("engine", {}).get("e2e_fps")
    base_steady = rows.get("engine", {}).get("steady_fps")

    def f(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)
    print(f"\n{gpu}, torch {torch.__version__}, {' '.join(config(a))}, {a.frames} frames, dummy weights\n")
    print("| path | e2e FPS | steady FPS | TTFF s | latency p50 / p95 ms | e2e / engine | steady / engine | "
          "start-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        e2e, st = r.get("e2e_fps"), r.get("steady_fps")
        print(f"| {name} | {f(e2e)} | {f(st)} | {f(r.get('ttff_s'), '{:.3f}')} | "
              f"{f(r.get('latency_p50_ms'), '{:.0f}')} / {f(r.get('latency_p95_ms'), '{:.0f}')} | "
              f"{f(e2e / base if e2e and base else None, '{:.2f}')} | "
              f"{f(st / base_steady if st and base_steady else None, '{:.2f}')} | "
              f"{f(r.get('startup_s') or r.get('warmup_s') or r.get('wall_s'), '{:.1f}')} |")


if __name__ == "__main__":
    main()
