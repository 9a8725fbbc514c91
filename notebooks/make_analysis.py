"""Writes notebooks/analysis.ipynb (without outputs) from the cells below: edit here, then

    python notebooks/make_analysis.py

The notebook reads a `sdv2 eval -m ...` sweep folder (SDV2_SWEEP_DIR) and writes its figures as PNGs.
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """\
# Sweep analysis: speed, latency, time to first frame, quality

Reads every job of one `sdv2 eval -m ...` sweep (a Hydra multirun folder) with
`sdv2_lab.eval.results.gather_results`: one row per video, with the job's overrides as columns. Then draws
four figures and writes them as PNGs (to `OUT_DIR`, default `<SWEEP_DIR>/figures`).

Run it on a sweep:

    sdv2 eval -m steps=1,2,3,4 vae=wan_tiny,taehv_tiny hydra.sweep.dir=multirun/my_sweep
    SDV2_SWEEP_DIR=multirun/my_sweep jupyter execute notebooks/analysis.ipynb   # or open it in Jupyter

**Definitions** (the project's `design.md`; implemented in `sdv2_lab/stream/timing.py`):

- **steady-state FPS** (`steady_fps`): output frames / wall time after warm-up (the first chunk and the first
  *n* chunks of an *n*-step stream batch are excluded);
- **end-to-end FPS** (`e2e_fps`): all output frames / time from the first input chunk to the last output frame;
- **TTFF** (`ttff_s`): buffering of the first 5-frame chunk at the input frame rate (`ttff_buffer_s`) + compute
  until the first output frame exists (`ttff_compute_s`);
- **per-chunk latency** (`latency_p50_ms`, `latency_p95_ms`, `latency_max_ms`): from a chunk's last input frame
  being available to its output frames existing."""),
    ("code", """\
# Parameters: the sweep folder (relative to the repository root or absolute) and where the figures go.
import os

SWEEP_DIR = os.environ.get("SDV2_SWEEP_DIR", "multirun/latest")
OUT_DIR = os.environ.get("SDV2_FIGURES_DIR")  # None: <SWEEP_DIR>/figures""", {"tags": ["parameters"]}),
    ("code", """\
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written as PNG files and shown from them
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

from sdv2_lab.eval.results import gather_results

sweep = Path(SWEEP_DIR)
if not sweep.is_absolute() and not sweep.exists() and (Path("..") / sweep).exists():
    sweep = Path("..") / sweep  # the notebook runs in notebooks/; sweeps live under the repository root
out = Path(OUT_DIR) if OUT_DIR else sweep / "figures"
out.mkdir(parents=True, exist_ok=True)

rows = gather_results(sweep)
if "status" in rows:
    rows = rows[rows["status"] == "ok"].copy()  # skipped videos have no numbers
if rows.empty:
    raise SystemExit(f"no finished videos under {sweep}")
rows["resolution"] = rows["height"].astype(int).astype(str) + "x" + rows["width"].astype(int).astype(str)
print(f"{len(rows)} videos from {rows['job'].nunique()} jobs in {sweep}")"""),
    ("md", """\
## Where the numbers come from

Every row records its weights (`weights`: `real` or `dummy`) and GPU. **Dummy weights** (random init) give
real speed numbers but noise as output, so their quality metrics mean nothing. Every figure's title says
which weights and GPUs its rows used."""),
    ("code", """\
dummy = rows["weights"] == "dummy"
if dummy.any():
    print(f"NOTE: {dummy.sum()} of {len(rows)} rows come from DUMMY weights: speed is real, outputs are noise, "
          "quality metrics mean nothing.")
PROVENANCE = (f"weights: {', '.join(sorted(rows['weights'].astype(str).unique()))}"
              f" | GPU: {', '.join(sorted(rows['gpu'].astype(str).unique()))}")
rows.groupby(["gpu", "weights", "commit"]).size().rename("videos").to_frame()"""),
    ("md", """\
A *configuration* is named by the settings that vary in this sweep (a video's other settings are shared by
all jobs). Numbers per configuration are means over its videos."""),
    ("code", """\
SETTINGS = ["backbone", "vae", "mode", "steps", "resolution", "attention", "num_kv_cache", "sink_frames",
            "adapt_sink_threshold", "fixed_noise", "input_fps", "gpu"]
varying = [c for c in SETTINGS if c in rows and rows[c].astype(str).nunique() > 1]
rows["config"] = rows[varying].astype(str).apply(lambda r: " ".join(f"{k}={v}" for k, v in r.items()), axis=1) \\
    if varying else rows["job"]
# the same without steps: one line per series in the steps plot
series_keys = [c for c in varying if c != "steps"]
rows["series"] = rows[series_keys].astype(str).agg(" ".join, axis=1) if series_keys else "all"


def save(fig, name):
    \"\"\"Write the figure as <out>/<name>.png and show that file.\"\"\"
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    return path


def mean_by(keys, columns):
    present = [c for c in columns if c in rows]
    return rows.groupby(keys, sort=True)[present].mean(numeric_only=True).reset_index()"""),
    ("md", """\
## 1. FPS vs denoising steps

One line per backbone / VAE (and whatever else the sweep varies). The stream batch puts *n* steps in flight at
once, so FPS falls much less than 1/*n*. Steady-state FPS leaves out warm-up chunks; end-to-end includes
them and the first chunk's compute, so it is lower on short clips."""),
    ("code", """\
fps = mean_by(["series", "steps"], ["steady_fps", "e2e_fps"])
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, column, title in [(axes[0], "steady_fps", "steady-state FPS"), (axes[1], "e2e_fps", "end-to-end FPS")]:
    for name, part in fps.groupby("series"):
        ax.plot(part["steps"], part[column], "o-", label=name)
    ax.set_title(title)
    ax.set_xlabel("denoising steps")
    ax.set_xticks(sorted(fps["steps"].unique()))
    ax.grid(alpha=0.3)
axes[0].set_ylabel("frames per second")
axes[1].legend(fontsize=8)
fig.suptitle(f"FPS vs steps ({PROVENANCE})")
save(fig, "fps_vs_steps")"""),
    ("md", """\
## 2. Per-chunk latency

The median (p50) and 95th percentile (p95) per configuration, with the worst chunk (max) as a marker. The
first chunk usually is the max: it pays for the whole stream batch filling up."""),
    ("code", """\
lat = mean_by("config", ["latency_p50_ms", "latency_p95_ms", "latency_max_ms"])
x = range(len(lat))
fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(lat)), 4))
ax.bar([i - 0.2 for i in x], lat["latency_p50_ms"], 0.4, label="p50")
ax.bar([i + 0.2 for i in x], lat["latency_p95_ms"], 0.4, label="p95")
ax.plot(list(x), lat["latency_max_ms"], "kx", label="max")
ax.set_xticks(list(x), lat["config"], rotation=30, ha="right", fontsize=8)
ax.set_ylabel("per-chunk latency (ms)")
ax.grid(axis="y", alpha=0.3)
ax.legend()
fig.suptitle(f"Latency per configuration ({PROVENANCE})")
save(fig, "latency")"""),
    ("md", """\
## 3. Quality vs speed

Each point is one configuration: a quality metric against steady-state FPS. Up to three of the metrics this
sweep measured are drawn, the paper's first (`metrics=none` measures none; `clip_consistency` needs CLIP
weights); the summary table at the end has them all. `warp_error_uint8`
is on the paper's scale, `warp_error_float` is the true L1 on 0-255; lower is better for warp error and
flicker, higher for CLIP consistency, SSIM and PSNR. With dummy weights these numbers describe noise."""),
    ("code", """\
QUALITY = ["clip_consistency", "warp_error_uint8", "warp_error_float", "flicker", "ssim", "psnr"]
measured = [c for c in QUALITY if c in rows and rows[c].notna().any()]
if not measured:
    print("no quality metrics in this sweep: no figure")
else:
    measured = measured[:3]  # the paper's metrics come first in QUALITY
    quality = mean_by("config", ["steady_fps", *measured])
    fig, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], measured):
        for _, r in quality.iterrows():
            ax.plot(r["steady_fps"], r[metric], "o", label=r["config"])
        ax.set_xlabel("steady-state FPS")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Quality vs speed ({PROVENANCE})")
    save(fig, "quality_vs_speed")"""),
    ("md", """\
## 4. Time to first frame

Stacked: the buffering of the first 5-frame chunk at the input rate (5/16 s at 16 FPS) and the compute until
the first output frame. The paper reports 0.47 s at 16 FPS input on an H100 (1.3B, 2 steps)."""),
    ("code", """\
ttff = mean_by("config", ["ttff_buffer_s", "ttff_compute_s"])
fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ttff)), 4))
ax.bar(ttff["config"], ttff["ttff_buffer_s"], label="buffering")
ax.bar(ttff["config"], ttff["ttff_compute_s"], bottom=ttff["ttff_buffer_s"], label="compute")
ax.set_xticks(range(len(ttff)), ttff["config"], rotation=30, ha="right", fontsize=8)
ax.set_ylabel("time to first frame (s)")
ax.grid(axis="y", alpha=0.3)
ax.legend()
fig.suptitle(f"TTFF per configuration ({PROVENANCE})")
save(fig, "ttff")"""),
    ("md", "## Summary per configuration (also written as `summary_by_config.csv`)"),
    ("code", """\
SUMMARY = ["steady_fps", "e2e_fps", "ttff_s", "latency_p50_ms", "latency_p95_ms", "encode_fps", "dit_fps",
           "decode_fps", "mfu", *QUALITY]
summary = mean_by("config", SUMMARY)
summary.insert(1, "videos", rows.groupby("config").size().values)
summary.insert(2, "weights", rows.groupby("config")["weights"].first().values)
summary.to_csv(out / "summary_by_config.csv", index=False)
summary.round(3)"""),
]


def build() -> nbformat.NotebookNode:
    cells = []
    for k, (kind, source, *metadata) in enumerate(CELLS):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cell = make(source, metadata=metadata[0] if metadata else {})
        cell.id = f"cell-{k:02d}"  # stable ids: regenerating the notebook gives no spurious diff
        cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("analysis.ipynb")
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote {path}")
