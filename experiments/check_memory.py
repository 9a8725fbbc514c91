"""GPU memory after a pipeline is gone: build, stream and release a pipeline three times; print the allocated
and reserved bytes at each point, and what is still alive when something stays. Writes
``experiments/results/check_memory_<gpu>.json``.

    python experiments/check_memory.py                          # 1.3B, 480x832, 1 step, Wan VAE, graphs + overlap
    python experiments/check_memory.py --how del                # `del pipe` only (no close(), no gc.collect())
    python experiments/check_memory.py --device cpu --backbone tiny --height 64 --width 96   # CPU smoke run

``--how close`` (default): ``pipe.close()``; ``del``: drop the last reference only (what refcounting frees: a
reference cycle holding device memory shows here); ``del+gc``: ``del`` then ``gc.collect()``. Expected with
``close``: ``allocated`` after the first release stays flat over the later cycles (within 16 MiB), no model,
driver or cache object is alive, and once cuBLAS's per-stream workspaces (kept by torch until exit, one per
stream a matmul ran on) are cleared at the end, ``allocated`` is back at the start (within 64 MiB). When a
cycle grows, the largest CUDA tensors still alive are listed with what holds them. ``del`` shows what a reference cycle keeps (the VAE's
``_steps`` hold bound methods of the VAE: it waits for the collector).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref
from pathlib import Path

import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clips

MIB = 2 ** 20


def memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"allocated_mib": None, "reserved_mib": None}
    torch.cuda.synchronize()
    return {"allocated_mib": round(torch.cuda.memory_allocated() / MIB, 1),
            "reserved_mib": round(torch.cuda.memory_reserved() / MIB, 1)}


def live_tensors(device_type: str, top: int = 10) -> list[dict]:
    """The largest tensors of ``device_type`` still reachable, with the types of what refers to them."""
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == device_type and obj.numel():
                found.append(obj)
        except Exception:  # noqa: BLE001 -- some objects refuse isinstance checks
            continue
    found.sort(key=lambda t: -t.numel() * t.element_size())
    out = []
    for t in found[:top]:
        holders = [type(r).__name__ + (f"({getattr(r, '__qualname__', '')})" if callable(r) else "")
                   for r in gc.get_referrers(t) if r is not found][:4]
        out.append({"mib": round(t.numel() * t.element_size() / MIB, 1), "shape": list(t.shape),
                    "dtype": str(t.dtype).replace("torch.", ""), "held_by": holders})
    return out


def live_blocks(top: int = 8) -> list[dict]:
    """The allocator's live blocks by (size, stream), largest first: what holds device memory no Python object
    owns (cuBLAS workspaces are one per stream)."""
    count: dict = {}
    for seg in torch.cuda.memory_snapshot():
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                key = (round(b["size"] / MIB, 2), seg["stream"])
                count[key] = count.get(key, 0) + 1
    rows = sorted(count.items(), key=lambda kv: -kv[0][0] * kv[1])[:top]
    return [{"mib": k[0], "stream": k[1], "blocks": n} for k, n in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="wan_1_3b")
    p.add_argument("--vae", default="wan")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--frames", type=int, default=0, help="frames per stream (0: enough to capture every graph)")
    p.add_argument("--how", choices=("close", "del", "del+gc"), default="close")
    p.add_argument("--extra", default="", help="more Hydra overrides, comma separated")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    ov = [f"backbone={a.backbone}", f"vae={a.vae}", f"steps={a.steps}", f"height={a.height}", f"width={a.width}",
          f"device={a.device}", *([x for x in a.extra.split(",") if x])]
    if cuda:
        ov += ["cuda_graph=true", "overlap=true"]
    cfg = compose_config("config", ov)
    frames = a.frames or 1 + 4 * (int(cfg.num_kv_cache) + a.steps + 6)
    rows, leftovers = [], []
    start = memory(a.device)
    print(f"start: {start}", flush=True)
    for cycle in range(a.cycles):
        row = {"cycle": cycle, "before": memory(a.device)}
        pipe = build_pipeline(cfg)
        row["built"] = memory(a.device)
        clip = synthetic_clip(frames, a.height, a.width)[0].to(pipe.device)
        for _ in range(2):   # the second stream replays the graphs the first captured
            stream_clips(pipe, [clip], ["a dog walks on the grass, realistic"], seeds=[0])
        row["streamed"] = memory(a.device)
        if cuda:
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        del clip
        probes = [weakref.ref(x) for x in (pipe.dit, pipe.vae, pipe.driver, pipe.executor, pipe.executor.cache.k)]
        if a.how == "close":
            pipe.close()
        del pipe
        if a.how == "del+gc":
            gc.collect()
        if cuda and a.how != "close":
            torch.cuda.empty_cache()
        row["released"] = memory(a.device)
        row["alive_after_release"] = [type(r()).__name__ for r in probes if r() is not None]   # any device
        if cuda:
            row["left_mib"] = round(row["released"]["allocated_mib"] - start["allocated_mib"], 1)
            # the first cycle may leave cuBLAS workspaces (the end check below clears them); later ones add nothing
            if rows and row["left_mib"] - rows[0]["left_mib"] > 16:
                row["alive"] = live_tensors("cuda")
                leftovers.append(row["left_mib"])
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
    end = {}
    if cuda:
        end["released"] = memory(a.device)
        end["blocks"] = live_blocks()
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        end["without_cublas_workspaces"] = memory(a.device)
        end["left_mib"] = round(end["without_cublas_workspaces"]["allocated_mib"] - start["allocated_mib"], 1)
        print(f"end: {json.dumps(end)}", flush=True)
        if end["left_mib"] > 64:
            leftovers.append(end["left_mib"])
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    tag = gpu.replace("NVIDIA ", "").split()[0].lower()
    out = Path(a.out) / f"check_memory_{tag}_{a.how.replace('+', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "config": ov, "frames": frames,
                               "how": a.how, "start": start, "cycles": rows, "end": end}, indent=1))
    alive = [r["alive_after_release"] for r in rows if r["alive_after_release"]]
    verdict = ("OK: back to the start after every release" if not leftovers and not alive else
               f"LEAK: {leftovers} MiB left after release (see 'alive'); objects alive: {alive}")
    if not cuda:
        verdict += " (CPU: objects only, no byte counts)"
    print(f"{a.how}: {verdict}; wrote {out}")
    if leftovers or alive:
        sys.exit(1)


if __name__ == "__main__":
    main()
