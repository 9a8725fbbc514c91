"""Paper-figure presets (conf/experiment) and experiments/paper_figures.py: the grids the presets sweep, the
tiny_smoke preset end to end on CPU, and the other figure kinds from hand-made rows."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "paper_figures.py"


@pytest.fixture(scope="module")
def paper_figures():
    sys.path.insert(0, str(SCRIPT.parent))
    import paper_figures
    yield paper_figures
    sys.path.remove(str(SCRIPT.parent))


def test_every_known_preset_has_a_file(paper_figures):
    files = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert set(paper_figures.PRESET_KINDS) <= files


@pytest.mark.parametrize("preset, jobs", [("fig9_fps_1_3b", 8), ("fig11_fps_14b", 8), ("ttff", 2),
                                          ("tab1_quality", 1), ("tab2_ablation", 4), ("tiny_smoke", 2)])
def test_preset_grid_is_its_sweeper_params(paper_figures, preset, jobs):
    grid = paper_figures.sweep_jobs(preset)
    assert len(grid) == jobs
    assert all(f"experiment={preset}" in job for job in grid)


def test_command_line_sweep_replaces_the_presets_for_that_key(paper_figures):
    grid = paper_figures.sweep_jobs("fig9_fps_1_3b", ["steps=1,2", "backbone=wan_14b"])
    assert len(grid) == 4  # 2 resolutions x 2 steps
    assert {o for job in grid for o in job if o.startswith("resolution=")} == {"resolution=480p",
                                                                                "resolution=512x512"}
    assert all("backbone=wan_14b" in job for job in grid)


def test_tiny_smoke_end_to_end(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "figures"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(SCRIPT), "tiny_smoke", "--run", "--sweep-dir", str(sweep),
                        "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    # `sdv2 eval -m experiment=tiny_smoke` swept the preset's grid (steps: 1,2) and only that
    jobs = sorted(d.name for d in sweep.iterdir() if (d / "results.jsonl").is_file())
    assert jobs == ["steps=1", "steps=2"]

    assert (out / "tiny_smoke.png").stat().st_size > 10_000
    table = pd.read_csv(out / "tiny_smoke.csv")
    assert {"ours_steady_fps", "ours_e2e_fps", "paper_fps_1gpu", "paper_fps_4gpu", "gpu", "weights"} <= set(table)
    assert sorted(table["steps"]) == [1, 2]
    assert (table["ours_e2e_fps"] > 0).all()
    assert list(table.sort_values("steps")["paper_fps_1gpu"]) == [20.47, 17.97]  # 1.3B 480p, 1 H100
    assert not table["comparable"].any()  # the tiny model is not the paper's
    markdown = (out / "tiny_smoke.md").read_text()
    for text in ("ours_steady_fps", "paper_fps_1gpu", "DUMMY weights", "GPU cpu", "§1.3"):
        assert text in markdown


def write_rows(sweep: Path, rows: list[dict]) -> None:
    from sdv2_lab.eval.results import ResultsWriter
    common = {"status": "ok", "weights": "real", "gpu": "NVIDIA H100 80GB HBM3", "mode": "single",
              "commit": "abc1234", "backbone": "wan_1_3b", "vae": "wan", "height": 480, "width": 832, "steps": 2}
    for k, row in enumerate(rows):
        ResultsWriter(sweep / f"job{k}").write({**common, **row})


@pytest.mark.parametrize("kind, rows, ours, theirs", [
    ("ttff", [{"input_fps": 16.0, "ttff_s": 0.5, "ttff_compute_s": 0.19, "ttff_buffer_s": 0.31},
              {"input_fps": 30.0, "ttff_s": 0.36, "ttff_compute_s": 0.19, "ttff_buffer_s": 0.17}],
     "ours_ttff_s", {"paper_ttff_s": [0.47, 0.37]}),
    ("quality", [{"clip_consistency": 98.0, "warp_error_uint8": 75.0, "warp_error_float": 9.0}],
     "ours_warp_error_uint8", {"paper_warp_error": [73.31]}),
    ("ablation", [{"sink_frames": s, "fixed_noise": f, "warp_error_uint8": 70.0 + k}
                  for k, (s, f) in enumerate([(0, True), (0, False), (3, True), (3, False)])],
     "ours_warp_error_uint8", {"paper_warp_error": [79.51, 75.71, 73.64, 73.13]}),
])
def test_other_kinds_put_ours_beside_the_papers(paper_figures, tmp_path, kind, rows, ours, theirs):
    write_rows(tmp_path / "sweep", rows)
    paths = paper_figures.make_outputs(kind, kind, tmp_path / "sweep", tmp_path / "out")
    table = pd.read_csv(paths["csv"])
    assert ours in table and table[ours].notna().all()
    for column, values in theirs.items():
        assert sorted(table[column]) == sorted(values)
    assert paths["png"].stat().st_size > 10_000
    assert "weights real" in paths["md"].read_text() and "H100" in paths["md"].read_text()
