"""Our engine and the published reference (StreamDiffusionV2 0.1.1), the same configurations, back to back in one
GPU call; writes ``experiments/results/sidebyside_<gpu>.{json,md}`` (the README's speed table comes from it).

    python experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py \
        --configs 1.3B:1:wan,1.3B:4:wan,1.3B:1:taehv,1.3B:1:taehv_full,1.3B:1:wan:512x512,14B:1:wan,14B:1:wan::fp8

A configuration is ``model:steps:vae[:HxW[:precision[:streams]]]``; ``vae`` is ``wan`` (Wan encode and decode),
``taehv`` (Wan encode, TAEHV decode: the reference's --use_taehv), ``taehv_full`` (TAEHV both ways),
``lightvae`` (LightVAE both ways: the Wan VAE at width 24), ``lighttae`` (Wan encode, LightTAE decode),
``lighttae_full`` (LightTAE both ways), or any ``conf/vae`` name (``wan_tiny`` for the CPU smoke run); the
reference has only ``wan`` and ``taehv`` (it reads no plugin VAE file), so the others have no reference column.
``streams`` (default 1): that many streams at once through one engine (one DiT call and one VAE call per stage
for all; the FPS columns are then totals over the streams). Ours: the engine's fastest settings (CUDA-graph DiT
step, stages overlapped on CUDA streams, fused Wan VAE), one discarded warm-up stream, then one timed stream of
``--frames`` frames (per stream).

    python experiments/bench_sidebyside.py --device cpu --ref-bench '' --frames 17 --out /tmp/sbs \
        --configs tiny:1:wan_tiny:32x48,tiny:1:lightvae_tiny:32x48::2   # the CPU smoke run
The reference: its own offline loop (``ref_bench.py``: model builders patched to random init), one process per
configuration, its own logged steady-state average beside its end-to-end FPS. Weights are DUMMY on both sides.
"""
import argparse
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.flops import mfu, peak_bf16_tflops
from sdv2_lab.settings import frame_flops
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.clips import stream_clips

BACKBONES = {"1.3B": "wan_1_3b", "14B": "wan_14b", "tiny": "tiny"}   # tiny: a CPU smoke run of this script
OUR_VAE = {"wan": "wan", "taehv": "taehv", "taehv_full": "taehv_full", "lightvae": "lightvae", "lighttae": "lighttae",
           "lighttae_full": "lighttae_full"}   # any other conf/vae name is used as it is
DEVICE, EXTRA = "cuda", []
REF_VAE = {"wan": "wan", "taehv": "taehv"}


def parse(spec: str) -> dict:
    parts = spec.split(":") + [""] * 6
    model, steps, vae, res, precision, streams = parts[:6]
    h, w = map(int, (res or "480x832").split("x"))
    return dict(model=model, steps=int(steps), vae=vae, height=h, width=w, precision=precision or "bf16",
                streams=int(streams or 1))


def ours(c: dict, frames: int) -> dict:
    n = c["streams"]
    ov = [f"backbone={BACKBONES[c['model']]}", f"steps={c['steps']}", f"device={DEVICE}", f"height={c['height']}",
          f"width={c['width']}", f"vae={OUR_VAE.get(c['vae'], c['vae'])}", "cuda_graph=true", "overlap=true",
          f"dit_precision={c['precision']}", f"streams={n}", *EXTRA]
    cfg = compose_config("config", ov)
    cuda = DEVICE.startswith("cuda")
    if cuda:   # each configuration's peak measured alone: nothing of the previous one counted
        gc.collect()
        torch.cuda.empty_cache()
        left_before = torch.cuda.memory_allocated()
    pipe = build_pipeline(cfg)
    try:
        clips = [synthetic_clip(frames, c["height"], c["width"], seed=i)[0].to(pipe.device) for i in range(n)]
        prompts = [f"a dog walks on the grass, realistic {i}" for i in range(n)]
        warm = 1 + 4 * (cfg.num_kv_cache + c["steps"] + 4)
        stream_clips(pipe, [clip[:, :warm] for clip in clips], prompts, seeds=list(range(n)))  # graphs too
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        r = stream_clips(pipe, clips, prompts, seeds=list(range(n)))
        s = r.per_stream[0] if n == 1 else r.total
        peak = (torch.cuda.max_memory_allocated() - left_before) / 2 ** 30 if cuda else float("nan")
        del clips
    finally:
        pipe.close()   # models, KV cache, graphs and their pools given back before the next configuration (a
                       # failed one too)
    flops = frame_flops(cfg)
    tflops = peak_bf16_tflops(torch.cuda.get_device_name(), None)[0] if cuda else None
    return dict(ours_e2e_fps=s.get("e2e_fps"), ours_steady_fps=s.get("steady_fps"), ours_encode_fps=s.get("encode_fps"),
                ours_dit_fps=s.get("dit_fps"), ours_decode_fps=s.get("decode_fps"), ttff_s=s.get("ttff_s"),
                ttff_compute_s=s.get("ttff_compute_s"), latency_p50_ms=s.get("latency_p50_ms"),
                latency_p95_ms=s.get("latency_p95_ms"), peak_gib=round(peak, 2),
                left_by_earlier_gib=round(left_before / 2 ** 30, 3) if cuda else None,
                mfu=mfu(flops, s["steady_fps"], tflops * 1e12) if tflops and s.get("steady_fps") else None)


def reference(c: dict, ref_bench: str, frames: int, timeout: int) -> dict:
    if c["vae"] not in REF_VAE or c["precision"] != "bf16" or c["streams"] != 1:
        return {}
    chunks = (frames - 1) // 4
    cmd = [sys.executable, ref_bench, c["model"], str(c["steps"]), REF_VAE[c["vae"]], str(chunks), str(c["height"]),
           str(c["width"])]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(ref_error=f"timed out after {timeout} s")
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        return dict(ref_error=(res.stderr or res.stdout)[-400:])
    r = json.loads(line)
    return dict(ref_e2e_fps=r["end_to_end_fps"], ref_steady_fps=r.get("logged_avg_fps"), ref_encode_fps=r.get("encode_fps"),
                ref_dit_fps=r.get("dit_fps"), ref_decode_fps=r.get("decode_fps"), ref_first_output_s=r.get("first_output_s"),
                ref_peak_gib=r.get("peak_mem_gib"))


def f(v, spec=".1f"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1.3B:1:wan,1.3B:4:wan,1.3B:1:taehv,1.3B:1:taehv_full,1.3B:1:wan:512x512,"
                                        "14B:1:wan,14B:1:wan::fp8")
    p.add_argument("--ref-bench", default=".refbench/ref_bench.py", help="the reference's bench script ('' = skip)")
    p.add_argument("--frames", type=int, default=129)
    p.add_argument("--frames-14b", type=int, default=65)
    p.add_argument("--ref-timeout", type=int, default=240)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--extra", default="", help="more Hydra overrides for our side, comma separated")
    a = p.parse_args()
    global DEVICE, EXTRA
    DEVICE, EXTRA = a.device, [x for x in a.extra.split(",") if x]
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu"
    # SDV2_COMMIT: set by whoever sends the tree to the GPU machine (its copy may carry stale git metadata)
    commit = os.environ.get("SDV2_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip()
    tag = gpu.replace("NVIDIA ", "").split()[0].lower()
    out_json = Path(a.out) / f"sidebyside_{tag}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    header = ("| model | steps | VAE | res | precision | streams | ours e2e FPS | ref e2e FPS | ratio | "
              "ours / ref steady FPS | ours / ref enc · DiT · dec FPS | TTFF s (compute) | latency p50/p95 ms | "
              "peak GiB | MFU |")
    lines = [header, "|" + "---|" * 15]
    print(header, flush=True)
    for spec in a.configs.split(","):
        c = parse(spec)
        frames = a.frames_14b if c["model"] == "14B" else a.frames
        row = dict(c, gpu=gpu, torch=torch.__version__, commit=commit, weights="dummy", frames=frames)
        try:
            row.update(ours(c, frames))
        except Exception as exc:  # noqa: BLE001 -- one configuration failing must not lose the others
            row["ours_error"] = f"{type(exc).__name__}: {exc}"[:400]
        if a.ref_bench and os.path.exists(a.ref_bench):
            row.update(reference(c, a.ref_bench, frames, a.ref_timeout))
        if row.get("ours_e2e_fps") and row.get("ref_e2e_fps"):
            row["ratio"] = row["ours_e2e_fps"] / row["ref_e2e_fps"]
            if row.get("ref_steady_fps") and row.get("ours_steady_fps"):
                row["steady_ratio"] = row["ours_steady_fps"] / row["ref_steady_fps"]
        rows.append(row)
        line = (f"| {c['model']} | {c['steps']} | {c['vae']} | {c['height']}x{c['width']} | {c['precision']} | "
                f"{c['streams']} | "
                f"{f(row.get('ours_e2e_fps'))} | {f(row.get('ref_e2e_fps'))} | {f(row.get('ratio'), '.2f')}× | "
                f"{f(row.get('ours_steady_fps'))} / {f(row.get('ref_steady_fps'))} | "
                f"{f(row.get('ours_encode_fps'), '.0f')}·{f(row.get('ours_dit_fps'), '.0f')}·{f(row.get('ours_decode_fps'), '.0f')}"
                f" / {f(row.get('ref_encode_fps'), '.0f')}·{f(row.get('ref_dit_fps'), '.0f')}·{f(row.get('ref_decode_fps'), '.0f')} | "
                f"{f(row.get('ttff_s'), '.3f')} ({f(row.get('ttff_compute_s'), '.3f')}) | "
                f"{f(row.get('latency_p50_ms'), '.0f')}/{f(row.get('latency_p95_ms'), '.0f')} | "
                f"{f(row.get('peak_gib'))} | {f(100 * row['mfu'] if row.get('mfu') else None)}% |")
        if row.get("ours_error") or row.get("ref_error"):
            line += f" errors: {row.get('ours_error', '')} {row.get('ref_error', '')}"
        lines.append(line)
        print(line, flush=True)
        out_json.write_text(json.dumps(rows, indent=1, default=str))  # after every row: a crash keeps the rest
    note = (f"\n{gpu}, torch {torch.__version__}, commit {commit}; dummy weights on both sides; ours after one "
            f"warm-up stream, the reference in a fresh process per configuration (its first chunk pays cold-start "
            f"costs: compare its steady column too).\n")
    out_json.with_suffix(".md").write_text("\n".join(lines) + "\n" + note)
    print(note)


if __name__ == "__main__":
    main()
