"""GPU checks of the stream engine that the CPU tests cannot make (CUDA streams, CUDA graphs, bf16 on the GPU).

    python experiments/check_engine.py [--backbone wan_1_3b --steps 2 --height 480 --width 832 --frames 41]
    python experiments/check_engine.py --backbone self_forcing --steps 0 --frames 105 --checks graph \
        --extra mode=single_wo,warmup=false       # the graphed passes of an all-steps chunk (a model's own loop)

1. overlap on (encode / DiT / decode on three CUDA streams) gives the same frames as overlap off, bit for bit;
2. the CUDA-graph executor gives the eager executor's frames within bf16 tolerance;
3. three streams batched into one DiT call give each stream's frames alone within bf16 tolerance, also when
   one stream leaves mid-way.
Prints one line per check and exits 1 if any fails. Weights are DUMMY (random).
"""
import argparse
import sys

import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clips


def run(a, clips, overlap=True, graph=True, streams=1, seeds=None):
    ov = [f"backbone={a.backbone}", *([f"steps={a.steps}"] if a.steps else []), "device=cuda", f"height={a.height}", f"width={a.width}",
          f"vae={a.vae}", f"overlap={'true' if overlap else 'false'}", f"cuda_graph={'true' if graph else 'false'}",
          f"streams={streams}", *[o for o in a.extra.split(",") if o]]
    pipe = build_pipeline(compose_config("config", ov))
    r = stream_clips(pipe, clips, [f"prompt {i}" for i in range(len(clips))], seeds=seeds or list(range(len(clips))),
                     keep_output=True)
    del pipe
    torch.cuda.empty_cache()
    return [o.float() for o in r.outputs]


def rel(a, b):
    n = min(a.shape[0], b.shape[0])
    return ((a[:n] - b[:n]).norm() / b[:n].norm().clamp_min(1e-12)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="wan_1_3b")
    p.add_argument("--vae", default="wan")
    p.add_argument("--steps", type=int, default=2, help="0: the backbone's recipe's")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=41)
    p.add_argument("--leaving", action="store_true", help="also: a stream leaving mid-way (tested on CPU anyway)")
    p.add_argument("--tol", type=float, default=0.03, help="relative L2 between bf16 runs that may round differently")
    p.add_argument("--checks", default="overlap,graph,streams", help="which checks, comma separated")
    p.add_argument("--extra", default="", help="more Hydra overrides, comma separated")
    a = p.parse_args()
    checks = set(a.checks.split(","))
    torch.backends.cudnn.benchmark = True
    clips = [synthetic_clip(a.frames, a.height, a.width, seed=i)[0].cuda() for i in range(3)]
    ok = True

    def report(name, err, limit):
        nonlocal ok
        good = err <= limit
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {name}: {err:.3g} (limit {limit:g})", flush=True)

    on = run(a, clips[:1], overlap=True)[0]
    if "overlap" in checks:
        off = run(a, clips[:1], overlap=False)[0]
        report("overlap on == off (max abs)", (on - off).abs().max().item(), 0.0)
    if "graph" in checks:
        eager = run(a, clips[:1], overlap=True, graph=False)[0]
        report(f"CUDA-graph executor vs eager (rel L2; {a.backbone} {a.extra})", rel(on, eager), a.tol)
    if "streams" not in checks:
        print("weights: DUMMY (random)")
        sys.exit(0 if ok else 1)
    alone = [on] + [run(a, [c], seeds=[i])[0] for i, c in enumerate(clips[1:], start=1)]
    together = run(a, clips, streams=3)
    for i in range(3):
        report(f"stream {i} of 3 vs alone (rel L2)", rel(together[i], alone[i]), a.tol)
    if a.leaving:
        mixed = run(a, [clips[0], clips[1][:, :17], clips[2]], streams=3)
        report("stream 0 beside one that leaves mid-way vs alone (rel L2)", rel(mixed[0], alone[0]), a.tol)
        report("stream 2 beside one that leaves mid-way vs alone (rel L2)", rel(mixed[2], alone[2]), a.tol)
    print("weights: DUMMY (random)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
