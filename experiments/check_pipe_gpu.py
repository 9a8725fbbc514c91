"""GPU checks of ``pipe`` mode that the CPU tests cannot make, runnable on ONE GPU: several stages share it over
the host-staged transport (``mode.transport=host``; NCCL refuses two ranks on one GPU). What this checks is the
GPU path of a multi-stage job (CUDA-graphed units, CUDA-event stage times, bf16, pooled receive buffers, block
moves of GPU tensors, draining and exiting); its FPS is NOT a pipe speed (the stages share one GPU and every
message goes through host memory).

    python experiments/check_pipe_gpu.py [--model 1.3B --steps 1,2 --frames 65 --ranks 2 --json out.json]

Per step count: single (CUDA graphs) against pipe on ``--ranks`` stages of one GPU, graphed and eager, and once
with blocks moved mid-stream (forced, so that graphs are dropped and captured again): relative L2 of the frames
(bf16: a unit of one row rounds differently from a job of n rows, so only the 1-step case is expected to be
near-identical), every rank's busy ms per chunk for its blocks and its graph replays. Then ``--exit-model``
(14B, 2 steps: the configuration where the reference hangs at exit) streamed and timed to the last rank's
return. Prints PASS/FAIL lines; exits 1 on a failure. Weights are DUMMY (random).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clip

MODELS = {"1.3B": "wan_1_3b", "14B": "wan_14b", "tiny": "tiny"}


def overrides(a, model: str, steps: int, extra=()) -> list[str]:
    return [f"backbone={MODELS[model]}", f"steps={steps}", f"device={a.device}", f"height={a.height}", f"width={a.width}",
            f"vae={a.vae}", "overlap=false", "output.dir=/tmp", *extra]


def rank_run(container: dict, frames: int, keep: bool):
    from sdv2_lab.parallel.context import current
    cfg = OmegaConf.create(container)
    cfg.device = str(current().device)
    pipe = build_pipeline(cfg)
    clip, _ = synthetic_clip(frames, cfg.height, cfg.width, seed=1)
    out, stats = stream_clip(pipe, clip, "a watercolor street", keep_output=keep, seed=0)
    return (out.float() if out is not None else None), stats


def single(a, model, steps):
    pipe = build_pipeline(compose_config("config", overrides(a, model, steps, ["cuda_graph=true"])))
    clip, _ = synthetic_clip(a.frames, a.height, a.width, seed=1)
    out, stats = stream_clip(pipe, clip, "a watercolor street", keep_output=True, seed=0)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out.float(), stats


def pipe(a, model, steps, extra=(), frames=None, keep=True):
    from sdv2_lab.parallel.launch import launch
    gpu = a.device.startswith("cuda")
    where = ["mode.transport=host", f"mode.gpu_ids=[{','.join(['0'] * a.ranks)}]"] if gpu else []
    cfg = compose_config("config", overrides(a, model, steps, ["mode=pipe", f"num_gpus={a.ranks}", *where, *extra]))
    t0 = time.perf_counter()
    res = launch(rank_run, (OmegaConf.to_container(cfg, resolve=True), frames or a.frames, keep),
                 devices=["cuda:0" if gpu else "cpu"] * a.ranks, timeout_s=120, transport="host" if gpu else "auto")
    return res[-1][0], res[-1][1], time.perf_counter() - t0


def rel(a, b) -> float:
    n = min(a.shape[0], b.shape[0])
    return ((a[:n] - b[:n]).norm() / b[:n].norm().clamp_min(1e-12)).item()


def per_rank(stats: dict, ranks: int) -> dict:
    keys = ("stage_ms", "blocks_ms", "graph_replays", "graph_captures", "bubble")
    return {f"r{r}": {k: round(stats[f"pipe_{k}_r{r}"], 3) if isinstance(stats.get(f"pipe_{k}_r{r}"), float)
                      else stats.get(f"pipe_{k}_r{r}") for k in keys} for r in range(ranks)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3B")
    p.add_argument("--steps", default="1,2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--vae", default="wan")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (gloo, tiny sizes)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--tol", type=float, default=0.05, help="relative L2, pipe vs single (bf16)")
    p.add_argument("--exit-model", default="14B", help="'' to skip the exit check")
    p.add_argument("--exit-steps", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    res = dict(gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu", torch=torch.__version__, model=a.model, ranks=a.ranks,
               height=a.height, width=a.width, vae=a.vae, frames=a.frames, weights="dummy", runs=[])
    ok = True

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=1))

    def report(name, err, limit, **info):
        nonlocal ok
        good = err <= limit
        ok &= good
        res["runs"].append(dict(check=name, value=err, limit=limit, verdict="PASS" if good else "FAIL", **info))
        print(f"{'PASS' if good else 'FAIL'} {name}: {err:.3g} (limit {limit:g}) {json.dumps(info)}", flush=True)
        save()

    half = None
    for steps in [int(s) for s in a.steps.split(",") if s]:
        ref, _ = single(a, a.model, steps)
        for label, extra in (("graphed", ["cuda_graph=true"]), ("eager", ["cuda_graph=false"])):
            try:
                out, stats, wall = pipe(a, a.model, steps, extra)
                report(f"{a.model} {steps} step(s): pipe {a.ranks} ranks on one GPU, {label}, vs single (rel L2)",
                       rel(out, ref), a.tol, ranks=per_rank(stats, a.ranks), wall_s=round(wall, 1),
                       shared_gpu_fps_not_a_pipe_speed=round(stats.get("steady_fps", 0.0), 2))
            except Exception as exc:  # noqa: BLE001 -- one failing run must not cost the others
                report(f"{a.model} {steps} step(s): pipe {label}", float("inf"), a.tol, error=f"{type(exc).__name__}: {exc}")
        if half is None:   # blocks moved mid-stream (once): graphs dropped and captured again, GPU tensors moved
            layers = compose_config("config", overrides(a, a.model, steps)).backbone.num_layers
            half = [layers // a.ranks] * a.ranks
            half[0] += layers - sum(half)
            moved = list(half)
            shift = min(2, half[-1] - 1)
            moved[0] += shift
            moved[-1] -= shift
            try:
                if not shift:
                    raise ValueError(f"{layers} blocks: too few to move some between {a.ranks} ranks")
                out, stats, wall = pipe(a, a.model, steps, ["cuda_graph=true", f"+mode.debug.rebalance_at={{8:{moved}}}".replace(" ", "")])
                report(f"{a.model} {steps} step(s): pipe, blocks {half} -> {moved} at chunk 8, vs single (rel L2)",
                       rel(out, ref), a.tol, split=stats.get("pipe_split"), moves=stats.get("pipe_rebalances"),
                       ranks=per_rank(stats, a.ranks))
            except Exception as exc:  # noqa: BLE001
                report(f"{a.model} {steps} step(s): pipe with moved blocks", float("inf"), a.tol,
                       error=f"{type(exc).__name__}: {exc}")
    if a.exit_model:
        try:
            t0 = time.perf_counter()
            _, stats, wall = pipe(a, a.exit_model, a.exit_steps, ["cuda_graph=true"], frames=33, keep=False)
            report(f"{a.exit_model} {a.exit_steps} steps: pipe {a.ranks} ranks streams 33 frames and every rank exits "
                   f"(seconds to the launcher's return)", wall, 240.0, ranks=per_rank(stats, a.ranks))
        except Exception as exc:  # noqa: BLE001
            report(f"{a.exit_model} {a.exit_steps} steps: pipe exits", float("inf"), 240.0,
                   error=f"{type(exc).__name__}: {exc}")
    print("weights: DUMMY (random); FPS on one shared GPU with host-staged messages is not a pipe speed")
    save()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
