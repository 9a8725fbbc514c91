"""A paper figure or table from a sweep of an experiment preset (conf/experiment/<preset>.yaml): our numbers
beside the paper's (experiments/paper_numbers.py), as a PNG, a Markdown table and a CSV.

    python experiments/paper_figures.py fig9_fps_1_3b --run                 # sweep, then figure and table
    python experiments/paper_figures.py fig9_fps_1_3b --sweep-dir multirun/paper/fig9_fps_1_3b/<time>
    python experiments/paper_figures.py tab1_quality --run --extra dataset.root=clips dataset.prompts_file=p.csv
    python experiments/paper_figures.py fig9_fps_1_3b --dry-run             # list the jobs of the preset's grid
    python experiments/paper_figures.py tiny_smoke --run                    # the same chain on CPU in seconds

--run launches `sdv2 eval -m experiment=<preset> hydra.sweep.dir=<dir> <extra...>`: the grid is the preset's
`hydra.sweeper.params` (an --extra sweep of the same key replaces it). Outputs go to <out>/<preset>.{png,md,csv},
<out> being --out or <sweep dir>/paper_figures. Every figure and table says which weights (real / dummy) and
which GPU our numbers come from.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

import paper_numbers as paper

# What each preset reproduces; a preset not listed here needs --kind.
PRESET_KINDS = {
    "fig9_fps_1_3b": "fps", "fig11_fps_14b": "fps", "tiny_smoke": "fps",
    "ttff": "ttff", "tab1_quality": "quality", "tab2_ablation": "ablation",
}
TITLES = {
    "fps": "FPS vs denoising steps (paper Fig. 9 / Fig. 11)",
    "ttff": "Time to first frame (paper Fig. 10)",
    "quality": "CLIP score and warp error (paper Table 1)",
    "ablation": "Sink tokens x dynamic noising (paper Table 2)",
}
PAPER_MODEL = {"wan_1_3b": "1.3B", "wan_14b": "14B"}
PAPER_RESOLUTION = {(480, 832): "480p", (512, 512): "512x512"}


# ---------------------------------------------------------------------------------------------- sweeping
def run_sweep(preset: str, sweep_dir: Path, extra: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Job folders named by their overrides (conf/eval.yaml numbers them); keep only the swept ones in the name,
    # since a long list of fixed --extra overrides makes a name past the file system's 255 bytes (every override
    # is in .hydra/ anyway).
    fixed = [o.key_or_group for o in OverridesParser.create().parse_overrides(extra) if not o.is_sweep_override()]
    exclude = ",".join(["experiment", *fixed])
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "eval", "-m", f"experiment={preset}",
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
           f"hydra.job.config.override_dirname.exclude_keys=[{exclude}]", *extra]
    print("running:", " ".join(cmd), flush=True)
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **os.environ}
    subprocess.run(cmd, check=True, env=env)


def sweep_jobs(preset: str, extra: list[str] = ()) -> list[list[str]]:
    """The overrides of every job `sdv2 eval -m experiment=<preset> <extra>` would launch, without running any:
    Hydra's basic sweeper logic (preset params first, command-line overrides of the same key replace them)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # private, but it *is* the grid logic
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sdv2_lab.build import CONF_DIR

    parser = OverridesParser.create()
    arguments = [f"experiment={preset}", *extra]
    fixed = [o.input_line for o in parser.parse_overrides(arguments) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=fixed, return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    return BasicSweeper.split_arguments(parser.parse_overrides(params + arguments), None)[0]


# ---------------------------------------------------------------------------------------------- tables
def mean_by(rows: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean of each column per group, as ``ours_<column>``; a column the rows lack gives NaN. The weights
    and GPU of each group's rows are columns too, so the CSV says them as well as the figure."""
    keys = [k for k in keys if k in rows]
    grouped = rows.groupby(keys, dropna=False, sort=True)
    table = grouped.size().rename("videos").reset_index()
    for column in ("weights", "gpu"):
        table[column] = grouped[column].agg(lambda v: ", ".join(sorted(set(map(str, v))))).reset_index(drop=True) \
            if column in rows else "unknown"
    for column in columns:
        table[f"ours_{column}"] = grouped[column].mean().reset_index(drop=True) if column in rows else math.nan
    return table


def paper_setup(row) -> tuple[str, str, bool]:
    """The paper's model and resolution to compare a row with, and whether that comparison is like for like
    (a tiny model or another resolution is set beside the 1.3B 480p numbers, marked not comparable)."""
    model = PAPER_MODEL.get(row["backbone"])
    resolution = PAPER_RESOLUTION.get((int(row["height"]), int(row["width"])))
    return model or "1.3B", resolution or "480p", bool(model and resolution)


def fps_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = mean_by(rows, ["backbone", "vae", "mode", "height", "width", "steps"], ["steady_fps", "e2e_fps"])
    for i, row in table.iterrows():
        model, resolution, comparable = paper_setup(row)
        steps = int(row["steps"])
        table.loc[i, "paper_setup"] = f"{model} {resolution} H100"
        table.loc[i, "comparable"] = comparable
        for gpus, fps in paper.FPS_H100[(model, resolution)].items():
            table.loc[i, f"paper_fps_{gpus}gpu"] = fps[steps - 1]
        # Fig. 15: 1 GPU without the stream batch (our mode single-wo); at 1 step the two are the same thing
        no_batch = paper.FPS_H100_NO_STREAM_BATCH.get((model, resolution), {})
        table.loc[i, "paper_fps_1gpu_no_stream_batch"] = \
            table.loc[i, "paper_fps_1gpu"] if steps == 1 else no_batch.get(steps, math.nan)
        like_wheel = comparable and resolution == "480p" and row["vae"] == "wan"  # what §1.7 measured
        wheel = paper.REFERENCE_WHEEL_480P.get((model, steps)) if like_wheel else None
        table.loc[i, "reference_wheel_e2e_fps"] = wheel[0] if wheel else math.nan
    same_mode = table["paper_fps_1gpu"].where(table.get("mode", "single") != "single-wo",
                                              table["paper_fps_1gpu_no_stream_batch"])
    table["ours_steady_vs_paper_1gpu"] = table["ours_steady_fps"] / same_mode
    return table


def ttff_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = mean_by(rows, ["backbone", "vae", "height", "width", "steps", "input_fps"],
                    ["ttff_s", "ttff_compute_s", "ttff_buffer_s"])
    for method, column in [("StreamDiffusionV2", "paper_ttff_s"), ("CausVid", "paper_causvid_ttff_s"),
                           ("Wan2.1-1.3B", "paper_wan_ttff_s")]:
        table[column] = [paper.TTFF_S[method].get(round(fps), math.nan) for fps in table["input_fps"]]
    return table


QUALITY_COLUMNS = ["clip_consistency", "warp_error_uint8", "warp_error_float"]


def quality_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = mean_by(rows, ["backbone", "vae", "height", "width", "steps"], QUALITY_COLUMNS)
    ours = next(r for r in paper.QUALITY if r["method"] == "StreamDiffusionV2")
    table["paper_clip_score"], table["paper_warp_error"] = ours["clip_score"], ours["warp_error"]
    return table


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    table = mean_by(rows, ["backbone", "steps", "sink_frames", "fixed_noise"], QUALITY_COLUMNS)
    table.insert(0, "sink_tokens", table["sink_frames"] > 0)
    table.insert(1, "dynamic_noise", ~table["fixed_noise"].astype(bool))
    by_variant = {(r["sink_tokens"], r["dynamic_noise"]): r for r in paper.ABLATION}
    for name in ("clip_score", "warp_error"):
        table[f"paper_{name}"] = [by_variant[(bool(s), bool(d))][name]
                                  for s, d in zip(table["sink_tokens"], table["dynamic_noise"])]
    return table


# ---------------------------------------------------------------------------------------------- figures
def plot_fps(table: pd.DataFrame, fig) -> None:
    panels = list(table.groupby(["backbone", "height", "width"], sort=True))
    for k, ((backbone, height, width), part) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for (vae, mode), series in part.groupby(["vae", "mode"]):
            ax.plot(series["steps"], series["ours_steady_fps"], "o-", label=f"ours steady, vae {vae}, {mode}")
            ax.plot(series["steps"], series["ours_e2e_fps"], "o:", label=f"ours end-to-end, vae {vae}, {mode}")
        steps = [1, 2, 3, 4]
        model, resolution, comparable = paper_setup(part.iloc[0])
        for gpus, fps in paper.FPS_H100[(model, resolution)].items():
            if gpus == 1:
                ax.plot(steps, fps, "ks--", label="paper, 1 GPU")
            else:  # needs pipe mode, not run here
                ax.plot(steps, fps, "--", color="grey", alpha=0.3 + 0.15 * gpus, label=f"paper, {gpus} GPUs (pipe mode: not run)")
        note = "" if comparable else f"\n(paper: {model} {resolution}; NOT comparable)"
        ax.set_title(f"{backbone} {height}x{width}{note}", fontsize=9)
        ax.set_xlabel("denoising steps")
        ax.set_xticks(steps)
        ax.set_ylabel("FPS")
        ax.set_yscale("log")  # a tiny CPU run and 4 H100s on one axis
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_ttff(table: pd.DataFrame, fig) -> None:
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r.backbone} {r.steps} step(s)\n{r.input_fps:g} FPS input" for r in table.itertuples()]
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], table["ours_ttff_buffer_s"], 0.4, label="ours: buffering (5 frames)")
    ax.bar([i - 0.2 for i in x], table["ours_ttff_compute_s"], 0.4, bottom=table["ours_ttff_buffer_s"],
           label="ours: compute")
    ax.bar([i + 0.2 for i in x], table["paper_ttff_s"], 0.4, color="k", label="paper StreamDiffusionV2")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("time to first frame (s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_quality(table: pd.DataFrame, fig, kind: str) -> None:
    if kind == "quality":  # the paper's four methods, then our configurations
        labels = [r["method"] for r in paper.QUALITY] + [f"ours {r.backbone} {r.steps} step(s)"
                                                         for r in table.itertuples()]
        paper_values = {m: [r[m] for r in paper.QUALITY] + [math.nan] * len(table)
                        for m in ("clip_score", "warp_error")}
        ours_values = {m: [math.nan] * len(paper.QUALITY) + list(table[c])
                       for m, c in (("clip_score", "ours_clip_consistency"), ("warp_error", "ours_warp_error_uint8"))}
    else:  # one pair of bars per ablation variant
        labels = [f"sinks {'on' if s else 'off'}\ndynamic noise {'on' if d else 'off'}"
                  for s, d in zip(table["sink_tokens"], table["dynamic_noise"])]
        paper_values = {m: list(table[f"paper_{m}"]) for m in ("clip_score", "warp_error")}
        ours_values = {"clip_score": list(table["ours_clip_consistency"]),
                       "warp_error": list(table["ours_warp_error_uint8"])}
    x = list(range(len(labels)))
    for k, (metric, axis_label) in enumerate([("clip_score", "CLIP score (consistency x100) ↑"),
                                              ("warp_error", "warp error (uint8 difference) ↓")]):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.bar([i - 0.2 for i in x], paper_values[metric], 0.4, color="k", label="paper")
        ax.bar([i + 0.2 for i in x], ours_values[metric], 0.4, label="ours")
        if all(math.isnan(v) for v in ours_values[metric]):
            ax.text(0.5, 0.5, "ours: not measured\n(metric weights missing?)", transform=ax.transAxes,
                    ha="center", color="tab:red")
        ax.set_xticks(x, labels, fontsize=7, rotation=20)
        ax.set_ylabel(axis_label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------- provenance
def provenance(rows: pd.DataFrame) -> list[str]:
    """Lines every output carries: which weights and which GPU(s) our numbers come from."""
    def values(column):
        return sorted(rows[column].dropna().astype(str).unique()) if column in rows else ["unknown"]
    weights = values("weights")
    lines = []
    if "dummy" in weights:
        lines.append("ours: DUMMY weights (random init): speed numbers are real, outputs are noise, "
                     "quality numbers mean nothing")
    else:
        lines.append(f"ours: weights {', '.join(weights)}")
    modes = values("mode")
    per_stream = " (one GPU per stream)" if all(m.startswith("single") for m in modes) else ""
    lines.append(f"ours: GPU {', '.join(values('gpu'))}; mode {', '.join(modes)}{per_stream}; "
                 f"commit {', '.join(values('commit'))}")
    return lines


PAPER_SOURCES = {
    "fps": [f"paper: {paper.FPS_H100_SOURCE}; reference wheel: {paper.REFERENCE_WHEEL_SOURCE}",
            "the paper's 2-4 GPU series use pipeline parallelism (`pipe` mode: add `mode=pipe num_gpus=N` on a "
            "machine with N GPUs); listed for reference, not swept here"],
    "ttff": [f"paper: {paper.TTFF_SOURCE}"],
    "quality": [f"paper: {paper.QUALITY_SOURCE}"],
    "ablation": [f"paper: {paper.ABLATION_SOURCE}"],
}


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.4g}"
        return str(value)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def make_outputs(preset: str, kind: str, sweep_dir: Path, out_dir: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdv2_lab.eval.results import gather_results

    rows = gather_results(sweep_dir)
    if rows.empty:
        raise SystemExit(f"no results rows under {sweep_dir}")
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    table = {"fps": fps_table, "ttff": ttff_table, "quality": quality_table, "ablation": ablation_table}[kind](rows)
    notes = provenance(rows) + PAPER_SOURCES[kind] + [f"sweep: {sweep_dir}"]
    if kind in ("quality", "ablation") and "metrics_missing" in rows:
        missing = sorted(set(",".join(rows["metrics_missing"].dropna().astype(str)).split(",")) - {""})
        if missing:
            notes.append(f"ours: metrics not measured (no local weights): {', '.join(missing)}")

    title = f"{TITLES[kind]}: {preset}"
    fig = plt.figure(figsize=(12 if kind != "ttff" else 8, 5.5))
    {"fps": plot_fps, "ttff": plot_ttff}.get(kind, lambda t, f: plot_quality(t, f, kind))(table, fig)
    fig.suptitle(title)
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 + 0.025 * len(notes), 1, 0.97))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{preset}.{ext}" for ext in ("png", "md", "csv")}
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    table.to_csv(paths["csv"], index=False)
    markdown = [f"# {title}", "", *[f"- {n}" for n in notes], "", markdown_table(table), ""]
    if kind == "quality":  # the whole of the paper's Table 1, our rows above are its last row's counterpart
        markdown += ["## Paper Table 1", "", markdown_table(pd.DataFrame(paper.QUALITY)), ""]
    paths["md"].write_text("\n".join(markdown), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="conf/experiment/<preset>.yaml, e.g. " + ", ".join(PRESET_KINDS))
    p.add_argument("--sweep-dir", type=Path, help="the multirun folder (with --run: where to write it; default "
                                                   "multirun/paper/<preset>/<time>)")
    p.add_argument("--run", action="store_true", help="run the preset's sweep first (sdv2 eval -m ...)")
    p.add_argument("--dry-run", action="store_true", help="only list the jobs the sweep would run")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for the sweep (with --run)")
    p.add_argument("--kind", choices=sorted(TITLES), help="the figure kind, for presets not in PRESET_KINDS")
    p.add_argument("--out", type=Path, help="output folder (default <sweep dir>/paper_figures)")
    a = p.parse_args(argv)
    kind = a.kind or PRESET_KINDS.get(a.preset)
    if kind is None:
        p.error(f"unknown preset {a.preset!r}: pass --kind ({', '.join(sorted(TITLES))})")

    if a.dry_run:
        for k, job in enumerate(sweep_jobs(a.preset, a.extra)):
            print(f"#{k}: {' '.join(job)}")
        return 0
    if a.run:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        sweep_dir = (a.sweep_dir or Path("multirun/paper") / a.preset / stamp).resolve()
        run_sweep(a.preset, sweep_dir, a.extra)
    elif a.sweep_dir is None:
        p.error("without --run, --sweep-dir names the sweep to read")
    else:
        sweep_dir = a.sweep_dir
    paths = make_outputs(a.preset, kind, sweep_dir, a.out or sweep_dir / "paper_figures")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
