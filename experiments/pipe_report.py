"""The `pipe` table from one ``gpu.sh pipe`` call: ours (measured, per-rank stage times, bubble, the predictor's
figure) beside the reference's pipe mode from the same call and the paper's H100 numbers.

    python experiments/pipe_report.py OUT_DIR [--md experiments/results/pipe_<gpu>.md]

Reads ``OUT_DIR/ours_*.json`` (``bench_pipe.py``), ``OUT_DIR/ref_pipe_*.txt`` and ``OUT_DIR/ref_single_*.txt`` (the
reference's JSON lines; a run without one is reported as failed or hung, with its exit status).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# The paper's Fig. 9 (1.3B) and Fig. 11 (14B), H100 NVLink: (model, size) -> GPUs -> FPS at 1..4 steps.
PAPER = {
    ("1.3B", "480x832"): {1: (20.47, 17.97, 15.68, 13.95), 2: (39.77, 34.67, 30.69, 27.06),
                          3: (43.88, 43.79, 41.13, 38.09), 4: (44.38, 43.41, 43.08, 42.26)},
    ("1.3B", "512x512"): {1: (26.21, 24.02, 21.51, 19.43), 2: (51.76, 46.92, 41.09, 37.49),
                          3: (63.45, 62.76, 56.75, 54.09), 4: (64.52, 63.99, 62.43, 61.57)},
    ("14B", "480x832"): {1: (12.68, 8.64, 6.49, 5.28), 2: (25.39, 17.31, 13.23, 10.69),
                         3: (37.55, 25.02, 19.12, 15.42), 4: (39.24, 33.36, 25.02, 20.05)},
    ("14B", "512x512"): {1: (18.71, 13.01, 10.09, 8.26), 2: (37.12, 25.72, 20.11, 16.65),
                         3: (53.84, 37.47, 29.34, 24.35), 4: (58.28, 51.09, 38.41, 31.62)},
}


def paper(model: str, size: str, gpus: int, steps: int):
    row = PAPER.get((model, size), {}).get(gpus)
    return row[steps - 1] if row and 1 <= steps <= 4 else None


def json_line(path: Path):
    """The reference's JSON line in a step's output, or None (and the exit status it ended with)."""
    text = path.read_text(errors="replace")
    found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    code = re.findall(r"^exit (\d+)$", text, flags=re.M)
    return (found[-1] if found else None), (int(code[-1]) if code else None)


def collect(out: Path) -> dict:
    ours, ref_pipe, ref_single = [], [], {}
    for f in sorted(out.glob("ours_*.json")):
        d = json.loads(f.read_text())
        size = f"{d['height']}x{d['width']}"
        one = {e["model"]: e for e in d.get("models", [])}
        single = (d.get("equality") or {}).get("single", {}).get("steady_fps")
        for name, m in d.get("measured", {}).items():
            pred = one.get(m["model"], {}).get("predicted_fps", {})
            ranks = int(m.get("pipe_ranks", m["gpus"]))
            ours.append(dict(model=m["model"], size=size, steps=m["steps"], gpus=m["gpus"],
                             schedule_block=bool(m.get("schedule_block")), fps=m.get("steady_fps"),
                             e2e_fps=m.get("e2e_fps"), ttff_s=m.get("ttff_s"), bubble=m.get("pipe_bubble"),
                             split=m.get("pipe_split"),
                             stage_ms=[m.get(f"pipe_stage_ms_r{r}") for r in range(ranks)],
                             predicted=pred.get(str(m["gpus"])) or pred.get(m["gpus"]), one_gpu=single,
                             gpu=d.get("gpu")))
    for f in sorted(out.glob("ref_pipe_*.txt")):
        got, code = json_line(f)
        m = re.match(r"ref_pipe_(\d+)gpu_([\d.]+B)_(\d+)(_sched)?(?:_(\d+x\d+))?$", f.stem)
        if m:
            ref_pipe.append(dict(gpus=int(m[1]), model=m[2], steps=int(m[3]), schedule_block=bool(m[4]),
                                 size=m[5] or "480x832", result=got, exit=code))
    for f in sorted(out.glob("ref_single_*.txt")):
        got, code = json_line(f)
        if got:
            ref_single[(got.get("model"), int(got.get("steps", 0)))] = got
    return dict(ours=ours, ref_pipe=ref_pipe, ref_single=ref_single)


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def table(data: dict) -> str:
    lines = ["| model | size | steps | GPUs | block scheduler | ours FPS | × our 1 GPU | TTFF s | stage ms per rank | "
             "bubble | split | predicted FPS | reference pipe FPS (e2e / its log) | paper (H100) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = {(r["model"], r["size"], r["steps"], r["gpus"], r["schedule_block"]): r for r in data["ref_pipe"]}
    for o in sorted(data["ours"], key=lambda o: (o["model"], o["size"], o["steps"], o["gpus"], o["schedule_block"])):
        r = refs.get((o["model"], o["size"], o["steps"], o["gpus"], o["schedule_block"]))
        if r is None:
            ref = "not run"
        elif r["result"] is None:
            ref = f"no result (exit {r['exit']}{': timed out, hung?' if r['exit'] == 124 else ''})"
        else:
            ref = f"{fmt(r['result'].get('end_to_end_fps'))} / {fmt(r['result'].get('logged_avg_fps'))}"
        ratio = o["fps"] / o["one_gpu"] if o["fps"] and o["one_gpu"] else None
        stages = ", ".join(fmt(s) for s in o["stage_ms"])
        bubble = "—" if o["bubble"] is None else f"{100 * o['bubble']:.1f}%"
        lines.append(f"| {o['model']} | {o['size']} | {o['steps']} | {o['gpus']} | {'on' if o['schedule_block'] else 'off'}"
                     f" | {fmt(o['fps'])} | {fmt(ratio, 2)} | {fmt(o['ttff_s'], 3)} | {stages} | {bubble}"
                     f" | {o['split'] or '—'} | {fmt(o['predicted'])} | {ref} | "
                     f"{fmt(paper(o['model'], o['size'], o['gpus'], o['steps']), 2)} |")
    for (model, steps), got in sorted(data["ref_single"].items()):
        lines.append(f"\nreference, one GPU, {model} / {steps} step(s): {fmt(got.get('end_to_end_fps'))} FPS end to end")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the directory gpu.sh pipe wrote")
    p.add_argument("--md", help="also write the table to this markdown file")
    a = p.parse_args()
    text = table(collect(Path(a.out)))
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
