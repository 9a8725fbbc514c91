"""Every mistake a user makes at the command line ends in one clear line (non-zero exit, no traceback, no folder
left behind), and Ctrl-C ends in one line (exit 130) that says what was kept. Subprocesses in a temporary working
directory, as a user runs them; the GPU is hidden so that a GPU preset fails as it does on a CPU machine."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.io.video import probe_video
from interrupts import sigint_as_a_terminal_sends_it

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
SMALL = ["height=32", "width=48"]
V2V_SMALL = ["--device", "cpu", "--height", "32", "--width", "48"]


def sdv2_cmd(*args):
    return [sys.executable, "-m", "sdv2_lab.cli", *args]


def v2v_cmd(*args):
    return ["bash", str(ROOT / "run_v2v.sh"), *args]


def run(cmd, cwd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)


LOG_LINE = re.compile(r"^\[[\d-]+ [\d:,]+\]\[[\w.]+\]\[(INFO|WARNING)\]")


def said(stderr: str) -> list[str]:
    """What the command said on stderr, less progress bars, log lines (run_v2v.sh logs to stderr) and W&B's."""
    lines = []
    for line in stderr.replace("\r", "\n").splitlines():
        line = line.strip()
        if line and "%|" not in line and not line.startswith(("Testing", "output frames", "wandb:")) \
                and not re.match(r"^\d+/\d+", line) and not LOG_LINE.match(line):
            lines.append(line)
    return lines


def one_line(res, *texts) -> str:
    assert res.returncode not in (0, None), res.stdout[-1500:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = said(res.stderr)
    assert len(lines) == 1, lines
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def write_cut_video(path: Path, frames: int = 33, keep: float = 0.5) -> None:
    """An mp4 whose header (moov first) is whole and whose frame data is cut at ``keep`` of the file."""
    import av
    container = av.open(str(path), "w", format="mp4", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=16)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(frames):   # noise: every frame costs about the same bytes
        frame = av.VideoFrame.from_ndarray((rng.random((32, 48, 3)) * 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The caller's folder: a clip, prompt files, a dataset folder with a broken video, broken config files."""
    d = tmp_path_factory.mktemp("mistakes")
    write_synthetic_clip(d / "clip.mp4", frames=13, height=32, width=48)
    write_synthetic_clip(d / "one.mp4", frames=1, height=32, width=48)
    write_cut_video(d / "cut.mp4")
    (d / "p.txt").write_text("a watercolor painting\n")
    (d / "latin1.txt").write_bytes("une peinture à l'huile\n".encode("latin-1"))
    (d / "broken.yaml").write_text("num_kv_cache: [5\nnum_sink_tokens: 2\n")
    clips = d / "clips"
    clips.mkdir()
    write_synthetic_clip(clips / "a.mp4", frames=13, height=32, width=48)
    (clips / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing")
    (clips / "p.jsonl").write_text('{"path": "a.mp4", "prompt": "a red square"}\n'
                                   '{"path": "b.mp4", "prompt": "a blue one"}\n')
    (clips / "bad.json").write_text('[{"video": "a.mp4", "prompt": "a red square"},')
    return d


def assert_nothing_left(workdir: Path) -> None:
    for folder in ("outputs", "multirun", "out"):
        assert not (workdir / folder).exists(), sorted(p.name for p in (workdir / folder).rglob("*"))


@pytest.mark.parametrize("args, texts", [
    (["eval", "dataset=folder"], ["give dataset.root=... and dataset.prompts_file=..."]),
    (["eval", "dataset=folder", "dataset.root=", "dataset.prompts_file=p.jsonl"], ["dataset.root is empty"]),
    (["eval", "dataset=folder", "dataset.root=nowhere", "dataset.prompts_file=p.jsonl"],
     ["dataset root is not a folder: nowhere (not found; dataset.root"]),
    (["eval", "dataset=folder", "dataset.root=clips", "dataset.prompts_file=bad.json"],
     ["bad.json line 1: invalid JSON"]),
    (["eval", "dataset=folder", "dataset.root=clips", "dataset.prompts_file=p.jsonl", "logger=none", "metrics=none"],
     ["b.mp4", "dataset.on_error=skip"]),
    (["eval", "experiment=fig9_fps_1_3b"], ["device=cuda (set by experiment=fig9_fps_1_3b) needs a CUDA GPU"]),
    (["eval", "-m", "experiment=fig9_fps_1_3b"], ["device=cuda (set by experiment=fig9_fps_1_3b) needs a CUDA GPU"]),
    (["eval", "step=2"], ["unknown key 'step'", "did you mean steps=2?"]),
    (["run", "foo=1"], ["unknown key 'foo'"]),
    (["run", "fps=0"], ["fps=0: expected a frame rate of at least 1"]),
    (["run", "fps=-5"], ["fps=-5: expected a frame rate of at least 1"]),
    (["run", "hydra.run.dir=/proc/x"], ["hydra.run.dir=/proc/x: cannot make folders in /proc"]),
    (["run", "input.prompt_file=latin1.txt"], ["latin1.txt is not UTF-8 text", "save it as UTF-8"]),
    (["run", "input=file", "input.video=one.mp4", "input.prompt=p"], ["one.mp4 is a one-frame video (h264)"]),
    (["run", "vae=wan_tin"], ["vae=wan_tin: no such choice (did you mean vae=wan_tiny?)"]),
])
def test_a_mistake_is_one_line_before_any_model_and_leaves_no_folder(workdir, args, texts):
    res = run(sdv2_cmd(*args, *SMALL), workdir)
    line = one_line(res, f"sdv2 {args[0]}: error: ", *texts)
    assert "+foo" not in line and "To append" not in line      # never Hydra's advice to add an unused key
    assert "Launching" not in res.stdout and "DUMMY" not in res.stdout + res.stderr   # nothing built or launched
    assert_nothing_left(workdir)


@pytest.mark.parametrize("args, texts", [
    (["--fps", "0"], ["--fps 0: expected a frame rate of at least 1"]),
    (["--fps", "-5"], ["--fps -5: expected a frame rate of at least 1"]),
    (["--video_path", "clip.mp4"], ["no prompt: give --prompt_file_path"]),
    (["--config_path", "broken.yaml"], ["broken.yaml: not valid YAML", "line 2"]),
    (["num_kv_cach=8"], ["unknown key 'num_kv_cach'", "did you mean num_kv_cache=8?"]),
])
def test_run_v2v_mistakes_are_one_line_in_its_flags(workdir, args, texts):
    res = run(v2v_cmd("single", *V2V_SMALL, "--output_folder", "out", *args), workdir)
    line = one_line(res, "run_v2v.sh: error: ", *texts)
    assert "or --prompt_file_path" not in line and "input." not in line
    assert_nothing_left(workdir)


def test_a_video_cut_short_names_the_file_and_frame_and_keeps_what_was_made(workdir, tmp_path):
    """Header fine, data cut: the frames before the cut are streamed and written, and the run fails naming the
    file and the frame (it used to fail after building the model with "Invalid data found", naming no file)."""
    res = run(sdv2_cmd("run", "input=file", f"input.video={workdir / 'cut.mp4'}", "input.prompt=p", *SMALL,
                       f"hydra.run.dir={tmp_path / 'run'}"), workdir)
    line = one_line(res, "sdv2 run: error: video ", "cut.mp4: frame ", " of 33 cannot be decoded",
                    "cut short or damaged")
    decoded = int(re.search(r"the (\d+) frame\(s\) before it decode", line).group(1))
    assert 5 <= decoded < 33
    written = probe_video(tmp_path / "run" / "output.mp4").frames
    assert 0 < written <= decoded and f"holds the {written} frames made before it" in line


# ---------------------------------------------------------------------------------------------- Ctrl-C
def interrupt(cmd, cwd, ready, timeout=600):
    """Start ``cmd``, send SIGINT once ``ready(stdout, stderr)`` holds, return (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_sends_it)
    out, err = [], []
    pumps = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), "")), daemon=True)
             for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for pump in pumps:
        pump.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready("".join(out), "".join(err)):
        assert time.monotonic() < deadline, "never got ready: " + "".join(err)[-2000:]
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted: " + "".join(err)[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    for pump in pumps:
        pump.join(timeout=30)
    return proc.returncode, "".join(out), "".join(err)


def frames_out(_, err) -> bool:
    counts = [int(n) for n in re.findall(r"(\d+)/\d+ \[", err)]
    return bool(counts) and max(counts) > 0


@pytest.mark.parametrize("front_end", ["sdv2 run", "run_v2v.sh"])
def test_ctrl_c_mid_stream_is_one_line_130_and_keeps_the_frames_written(tmp_path, front_end):
    if front_end == "sdv2 run":
        cmd, video = sdv2_cmd("run", "input.frames=2001", *SMALL, "hydra.run.dir=run"), tmp_path / "run" / "output.mp4"
    else:
        cmd, video = v2v_cmd("single", *V2V_SMALL, "--output_folder", "out", "input.frames=2001"), \
            tmp_path / "out" / "output_000.mp4"
    code, out, err = interrupt(cmd, tmp_path, frames_out)
    assert code == 130 and "Traceback" not in err + out, err[-3000:]
    lines = said(err)
    assert len(lines) == 1 and lines[0].startswith(f"{front_end}: interrupted: kept the "), lines
    kept = int(re.search(r"kept the (\d+) frame", lines[0]).group(1))
    assert kept > 0 and probe_video(video).frames == kept and str(video) in lines[0]
    assert {p.name for p in video.parent.iterdir()} - {".hydra", "cli.log"} == {video.name}   # no temporary file


def test_ctrl_c_in_eval_keeps_and_summarises_the_videos_measured(tmp_path):
    run_dir = tmp_path / "run"

    def one_row_written(*_):
        path = run_dir / "results.jsonl"
        return path.exists() and path.read_text().count("\n") >= 1
    code, out, err = interrupt(sdv2_cmd("eval", "dataset.n=20", "dataset.frames=9", "eval.warmup=false", "metrics=none",
                                        "logger=none", "eval.save_videos=0", *SMALL, f"hydra.run.dir={run_dir}"),
                               tmp_path, one_row_written)
    assert code == 130 and "Traceback" not in err + out, err[-3000:]
    lines = said(err)
    assert len(lines) == 1, lines
    match = re.match(r"sdv2 eval: interrupted: (\d+) of 20 videos kept", lines[0])
    assert match, lines[0]
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert int(match.group(1)) == len(rows) == summary["videos"] and 1 <= len(rows) < 20
    assert summary["status"] == "interrupted" and "e2e_fps" in summary
