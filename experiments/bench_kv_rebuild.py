"""What the KV rebuilds (sdv2_lab/stream/kv_rebuild.py) cost on a GPU, dummy weights, text-to-video, mode single-wo:

* LongLive's recache: the time of a prompt switch (``set_prompt``: prompt encode, cross-attention K/V, and with
  ``kv_recache`` the replay of up to ``num_kv_cache`` clean latent frames at t = 0), with the recache off and on;
* Krea's recompute: the steady time per chunk with ``kv_recompute_frames`` 0 and the recipe's 3.

    python experiments/bench_kv_rebuild.py --height 480 --width 832            # longlive, then krea_14b
    python experiments/bench_kv_rebuild.py --device cpu --height 32 --width 48 --backbones tiny:longlive

Each time is host wall time between two device syncs, after ``--warm`` chunks; per-chunk times include the chunk's
decode (the same VAE both ways), so the difference is the rebuild's.
"""
import argparse
import json
import statistics
import time

import torch

from sdv2_lab.build import build_pipeline, compose_config


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0)


def run(backbone: str, recipe: str, a, extra: list[str]) -> dict:
    ov = [f"backbone={backbone}", f"backbone/recipe={recipe}", "mode=single_wo", f"device={a.device}",
          f"height={a.height}", f"width={a.width}", f"vae={a.vae}", "t2v=true", "warmup=false", *extra]
    pipe = build_pipeline(compose_config("config", ov))
    d, dev = pipe.driver, pipe.device
    s = d.open("a watercolor street", seed=0)
    chunk = lambda: d._run([d.scheduler.noise_chunk(s)])   # noqa: E731
    for _ in range(a.warm):
        chunk()
    chunks = [timed(dev, chunk) for _ in range(a.chunks)]
    switches = []
    for i in range(a.switches):   # a switch, then one chunk (the stream goes on after it)
        switches.append(timed(dev, lambda: d.set_prompt(s, f"a city at night {i}")))
        chunk()
    row = dict(backbone=backbone, recipe=recipe, extra=" ".join(extra), rebuild=d.cfg.kv_rebuild,
               chunk_ms_median=statistics.median(chunks), switch_ms_median=statistics.median(switches),
               weights="dummy" if d.weights_are_dummy else "real")
    d.close(s)
    pipe.close()   # models, cache and graphs given back (and the CUDA cache emptied) before the next row
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--vae", default="taehv")
    p.add_argument("--backbones", default="wan_1_3b:longlive,krea_14b:krea", help="backbone:recipe,...")
    p.add_argument("--warm", type=int, default=8, help="chunks before timing (the cache full, kernels tuned)")
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--switches", type=int, default=4)
    p.add_argument("--order", default="off,on", help="off,on or on,off: which setting runs first (warm-up effects)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    print("| backbone | recipe | setting | rebuild | chunk ms (median) | prompt switch ms (median) |")
    print("|---|---|---|---|---|---|")
    for item in a.backbones.split(","):
        backbone, _, recipe = item.partition(":")
        off = ["kv_recache=false"] if recipe == "longlive" else ["kv_recompute_frames=0", "sink_frames=3"]
        for extra in [off if o == "off" else [] for o in a.order.split(",")]:
            r = run(backbone, recipe, a, extra)
            rows.append(r)
            print(f"| {backbone} | {recipe} | {r['extra'] or 'recipe'} | {r['rebuild']} | {r['chunk_ms_median']:.1f} | "
                  f"{r['switch_ms_median']:.1f} |", flush=True)
            if a.json:   # after every row: a crash keeps what was measured
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print(f"weights: {rows[0]['weights'].upper() if rows else 'n/a'}")


if __name__ == "__main__":
    main()
