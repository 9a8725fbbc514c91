"""Record every DiT call a pipeline makes over a long stream: rows, virtual start positions, timesteps, which
rows evict and which pop the eviction ring. ``dit_calls.json`` beside this file was written by this script
from the pipeline as it was before the stream engine (commit bda6831: ``StreamPipeline`` with its
``StreamBatch`` / ``Sequential`` strategies), run from a checkout of that commit:

    PYTHONPATH=<checkout of bda6831> python tests/golden/record_dit_calls.py tests/golden/dit_calls.json

``tests/test_scheduler.py`` runs the same streams through today's engine and compares call by call.
"""
from __future__ import annotations

import json
import sys

import torch

CASES = [  # (mode, steps, chunks, position_refresh_frames, t2v)
    ("single", 1, 64, 12, False), ("single", 2, 64, 12, False), ("single", 3, 64, 12, False),
    ("single", 4, 64, 12, False), ("single-wo", 2, 64, 12, False), ("single-wo", 3, 64, 12, False),
    ("single", 2, 20, 50, True),
]
H, W = 32, 48


def clip(frames: int) -> torch.Tensor:
    from sdv2_lab.io.synthetic import synthetic_clip
    return synthetic_clip(frames, H, W, velocity=(0.7, 2.3))[0]


def build(mode, steps, refresh, t2v):
    from sdv2_lab.build import build_pipeline, compose_config
    par = "single" if mode == "single" else "single_wo"
    return build_pipeline(compose_config("config", [f"parallel={par}", f"steps={steps}", "device=cpu", f"height={H}",
                                                    f"width={W}", "vae=wan_tiny", f"position_refresh_frames={refresh}",
                                                    f"t2v={'true' if t2v else 'false'}"]))


def run_case(pipe, chunks: int, t2v: bool, record: list) -> None:
    torch.manual_seed(0)
    pipe.start("a long stream")
    if t2v:
        pipe.generate(4 * chunks)
    else:
        video = clip(1 + 4 * chunks)
        pipe.push(video)
        pipe.flush()


def main(out_path: str) -> None:
    from sdv2_lab.backbones import kv_cache

    calls: list = []
    original = kv_cache.StreamKVCache.plan

    def plan(self, starts, num_tokens):
        p = original(self, starts, num_tokens)
        calls.append({"rows": list(range(len(starts))), "starts": [int(c) for c in starts], "tokens": num_tokens,
                      "evict": list(p.evict), "pop": [bool(x) for x in p.pop_mask.tolist()]})
        return p

    kv_cache.StreamKVCache.plan = plan
    from sdv2_lab.backbones import wan_dit
    step = wan_dit.CausalWanDiT.step

    def traced_step(self, x, t, cache, plan):
        calls[-1]["t"] = t[:, 0].tolist()
        return step(self, x, t, cache, plan)

    wan_dit.CausalWanDiT.step = traced_step
    golden = []
    for mode, steps, chunks, refresh, t2v in CASES:
        calls.clear()
        run_case(build(mode, steps, refresh, t2v), chunks, t2v, calls)
        golden.append({"mode": mode, "steps": steps, "chunks": chunks, "refresh": refresh, "t2v": t2v,
                       "calls": [dict(c) for c in calls]})
        print(mode, steps, len(calls), "calls")
    json.dump(golden, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
