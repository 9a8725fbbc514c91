"""experiments/pipe_report.py: a gpu.sh pipe directory (bench_pipe JSON, the reference's JSON lines, a run that
hung) becomes one table with ratios to our one-GPU FPS, the predictor's figure and the paper's number."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import pipe_report  # noqa: E402


def test_report_joins_ours_the_reference_and_the_paper(tmp_path):
    ours = dict(gpu="X", height=480, width=832, equality={"single": {"steady_fps": 40.0}},
                models=[{"model": "1.3B", "predicted_fps": {"1": 40.5, "2": 80.3}}],
                measured={"1.3B x2": dict(model="1.3B", gpus=2, steps=1, schedule_block=False, steady_fps=76.0,
                                          e2e_fps=70.0, ttff_s=0.5, pipe_ranks=2, pipe_bubble=0.05,
                                          pipe_split="[20, 10]", pipe_stage_ms_r0=48.0, pipe_stage_ms_r1=50.0),
                          "1.3B x2 block scheduler": dict(model="1.3B", gpus=2, steps=1, schedule_block=True,
                                                          steady_fps=78.0, pipe_ranks=2)})
    (tmp_path / "ours_1.3B_1_480x832.json").write_text(json.dumps(ours))
    (tmp_path / "ref_pipe_2gpu_1.3B_1.txt").write_text(
        "log\n" + json.dumps(dict(end_to_end_fps=30.0, logged_avg_fps=35.5, model="1.3B", steps=1)) + "\nexit 0\n")
    (tmp_path / "ref_pipe_2gpu_1.3B_1_sched_480x832.txt").write_text("Traceback ...\nexit 124\n")
    (tmp_path / "ref_single_1.3B_1.txt").write_text(json.dumps(dict(model="1.3B", steps=1, end_to_end_fps=12.6)))
    text = pipe_report.table(pipe_report.collect(tmp_path))
    rows = [r for r in text.splitlines() if r.startswith("| 1.3B")]
    assert len(rows) == 2
    off, on = rows
    cells = [c.strip() for c in off.strip("|").split("|")]
    assert cells[3:7] == ["2", "off", "76.0", "1.90"] and cells[8] == "48.0, 50.0" and cells[9] == "5.0%"
    assert cells[11] == "80.3" and cells[12] == "30.0 / 35.5" and cells[13] == "39.77"
    assert "no result (exit 124: timed out, hung?)" in on and "| on | 78.0 | 1.95 |" in on
    assert "reference, one GPU, 1.3B / 1 step(s): 12.6 FPS" in text
