"""A run's timings as its user reads them (the metrics are defined in docs/metrics.md)."""
from __future__ import annotations


def format_stats(s: dict) -> str:
    def f(key, fmt="{:.2f}", unit=""):
        v = s.get(key)
        return (s.get(f"{key}_note") or "n/a") if v is None else fmt.format(v) + unit
    return ("\n".join([
        f"wrote {s.get('output')} ({s.get('output_frames')} frames; weights: {s.get('weights')})",
        f"  end-to-end FPS {f('e2e_fps')}   steady-state FPS {f('steady_fps')}",
        f"  time to first frame {f('ttff_s', '{:.3f}', ' s')} (compute {f('ttff_compute_s', '{:.3f}', ' s')} + "
        f"buffering {f('ttff_buffer_s', '{:.3f}', ' s')})",
        f"  per-chunk latency p50 {f('latency_p50_ms', '{:.1f}', ' ms')}  p95 {f('latency_p95_ms', '{:.1f}', ' ms')}"
        f"  max {f('latency_max_ms', '{:.1f}', ' ms')}",
        f"  stages: encode {f('encode_fps', '{:.1f}', ' FPS')}  DiT {f('dit_fps', '{:.1f}', ' FPS')}  "
        f"decode {f('decode_fps', '{:.1f}', ' FPS')}",
    ]))


def format_pipe(s: dict) -> str:
    ranks = int(s.get("pipe_ranks", 0))
    parts = [f"  pipe: {ranks} stage(s), blocks {s.get('pipe_split')}, bubble "
             f"{100 * s['pipe_bubble']:.1f}%" if s.get("pipe_bubble") is not None else
             f"  pipe: {ranks} stage(s), blocks {s.get('pipe_split')}"]
    for r in range(ranks):
        if f"pipe_stage_ms_r{r}" in s:
            parts.append(f"    rank {r}: {s[f'pipe_stage_ms_r{r}']:.1f} ms busy per chunk (blocks "
                         f"{s.get(f'pipe_blocks_ms_r{r}', 0):.1f})")
    if s.get("pipe_rebalances"):
        parts.append(f"    block scheduler: {s['pipe_rebalances']} move(s)")
    return "\n".join(parts)
