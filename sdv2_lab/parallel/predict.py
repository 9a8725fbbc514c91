"""Expected ``pipe`` throughput from one-GPU measurements.

    python -m sdv2_lab.parallel.predict --layers 30 --steps 2 --block-ms 1.1 --encode-ms 10.5 --decode-ms 16.6 \\
        --act-mb 4.8 --link-gbps 200
    python -m sdv2_lab.parallel.predict --from experiments/results/bench_pipe.json   # what bench_pipe.py measured

The model (the schedule ``stage.py`` runs): a job (one chunk through every stream-batch slot) costs stage r
``T_r = overhead_r + blocks_r * block`` — the first stage adds VAE encode and the patch/time embedding, the last
the head, x0 / re-noising and VAE decode — with blocks split by ``balance.split`` (what the block scheduler
converges to). Activations move asynchronously, overlapped with compute, so a link only limits throughput when
sending a job's units takes longer than the stage computes. A job is ``n`` units (one per slot); unit (k, i)
needs unit (k-1, i-1) to have passed every stage and come back, which bounds the period per job by
``n / (n + 1) * cycle`` (cycle = one unit through all stages plus the hops); a single stream keeps every
stage busy when ``n + 1 >= W`` (roughly), more streams fill it further. FPS = frames per chunk / period.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .balance import counts_of, split


@dataclass
class OneGPU:
    """One-GPU measurements, per job (a chunk through all n slots) unless said otherwise."""
    layers: int
    steps: int                 # n: stream-batch slots = units per job
    block_ms: float            # one block, all n rows
    encode_ms: float           # VAE encode of one chunk (+ noise controller)
    decode_ms: float           # VAE decode of one chunk
    embed_ms: float = 0.0      # patch + time embedding of a job
    head_ms: float = 0.0       # head, unpatchify, x0 and re-noising of a job
    act_bytes: float = 0.0     # one unit's activation message (one row: F*S*D elements)
    link_gbps: float = 100.0   # point-to-point bandwidth between neighbouring GPUs, GB/s
    link_latency_us: float = 20.0
    frames_per_chunk: int = 4
    streams: int = 1
    batched_block_ms: float = 0.0  # one block over the whole n-row job at once (what one stage runs); 0: n units


@dataclass
class Prediction:
    gpus: int
    counts: list[int]
    stage_ms: list[float]
    period_ms: float
    fps: float
    bubble: float
    bound: str                 # what limits it: "stage r", "dependency cycle", "link"


def predict(m: OneGPU, gpus: int) -> Prediction:
    n = m.steps
    if gpus == 1:
        t = m.encode_ms + m.embed_ms + m.layers * (m.batched_block_ms or m.block_ms) + m.head_ms + m.decode_ms
        return Prediction(1, [m.layers], [t], t, m.frames_per_chunk * m.streams / t * 1e3, 0.0, "stage 0")
    overhead = [0.0] * gpus
    overhead[0] += m.encode_ms + m.embed_ms
    overhead[-1] += m.head_ms + m.decode_ms
    counts = counts_of(split(m.layers, overhead, [m.block_ms] * gpus))
    stage = [o + c * m.block_ms for o, c in zip(overhead, counts)]
    hop_ms = m.link_latency_us / 1e3 + m.act_bytes * max(1, m.streams) / (m.link_gbps * 1e9) * 1e3
    link_ms = n * hop_ms                              # a stage sends n units per job
    period, bound = max(stage), f"stage {stage.index(max(stage))}"
    if link_ms > period:
        period, bound = link_ms, "link"
    if n >= 2:
        per_unit = [c * m.block_ms / n for c in counts]
        per_unit[0] += m.embed_ms / n
        per_unit[-1] += m.head_ms / n
        cycle = sum(per_unit) + gpus * hop_ms       # W - 1 forward hops and the way back
        if n / (n + 1) * cycle > period:
            period, bound = n / (n + 1) * cycle, "dependency cycle (n + 1 < stages)"
    bubble = 1 - sum(stage) / (gpus * period)
    return Prediction(gpus, counts, stage, period, m.frames_per_chunk * m.streams / period * 1e3, bubble, bound)


def from_bench(path: str | Path, model: Optional[str] = None) -> list[tuple[str, OneGPU, dict]]:
    """(label, measurements, measured pipe FPS by GPU count) per model in a bench_pipe.py JSON."""
    data = json.loads(Path(path).read_text())
    out = []
    for entry in data.get("models", []):
        if model and entry["model"] != model:
            continue
        p = entry["predictor"]
        out.append((f"{entry['model']} / {p['steps']} step(s) / {entry.get('vae', '?')}", OneGPU(**p),
                    {int(k): v for k, v in entry.get("measured_fps", {}).items()}))
    return out


def table(label: str, m: OneGPU, gpus=(1, 2, 4, 8), measured: Optional[dict] = None) -> str:
    lines = [f"{label}: {m.layers} blocks, {m.steps} step(s), block {m.block_ms:.3f} ms/job, encode "
             f"{m.encode_ms:.2f} ms, decode {m.decode_ms:.2f} ms, activation {m.act_bytes / 1e6:.2f} MB/unit, "
             f"link {m.link_gbps:g} GB/s",
             f"{'GPUs':>4} {'blocks per stage':<24} {'slowest stage ms':>16} {'period ms':>9} {'FPS':>7} "
             f"{'bubble':>6} {'measured FPS':>12}  bound"]
    for g in gpus:
        if g > m.layers:
            continue
        p = predict(m, g)
        got = (measured or {}).get(g)
        lines.append(f"{g:>4} {str(p.counts):<24} {max(p.stage_ms):>16.2f} {p.period_ms:>9.2f} {p.fps:>7.1f} "
                     f"{p.bubble:>6.1%} {('%.1f' % got) if got else '-':>12}  {p.bound}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sdv2_lab.parallel.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", help="a bench_pipe.py JSON (one table per model in it)")
    ap.add_argument("--model", help="with --from: only this model (1.3B, 14B)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--block-ms", type=float)
    ap.add_argument("--encode-ms", type=float, default=0.0)
    ap.add_argument("--decode-ms", type=float, default=0.0)
    ap.add_argument("--embed-ms", type=float, default=0.0)
    ap.add_argument("--head-ms", type=float, default=0.0)
    ap.add_argument("--act-mb", type=float, default=0.0, help="activation per unit, MB")
    ap.add_argument("--link-gbps", type=float, default=None, help="GPU-to-GPU bandwidth, GB/s")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--gpus", default="1,2,4,8")
    a = ap.parse_args(argv)
    gpus = tuple(int(g) for g in a.gpus.split(","))
    if a.source:
        found = from_bench(a.source, a.model)
        if not found:
            sys.exit(f"{a.source}: no model entries{' for ' + a.model if a.model else ''}")
        for label, m, measured in found:
            if a.link_gbps:
                m.link_gbps = a.link_gbps
            m.streams = a.streams
            print(table(label, m, gpus, measured) + "\n")
        return
    if a.block_ms is None:
        ap.error("give --block-ms (and the VAE times), or --from a bench_pipe.py JSON")
    m = OneGPU(layers=a.layers, steps=a.steps, block_ms=a.block_ms, encode_ms=a.encode_ms, decode_ms=a.decode_ms,
               embed_ms=a.embed_ms, head_ms=a.head_ms, act_bytes=a.act_mb * 1e6, link_gbps=a.link_gbps or 100.0,
               streams=a.streams)
    print(table("given", m, gpus))


if __name__ == "__main__":
    main()
