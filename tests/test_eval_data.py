"""Evaluation data and results files: datasets (folder + prompts file, synthetic), the DataModule and its DDP
split, the crash-safe results writer and the multirun gatherer."""
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from sdv2_lab.eval.datamodule import EvalDataModule
from sdv2_lab.eval.datasets import (EvalDataset, FolderDataset, PromptsFileError, ShardSampler, SyntheticDataset,
                                    VideoItem, build_dataset, read_prompts_file)
from sdv2_lab.eval.results import ResultsWriter, _git_state, gather_results, main as results_main, run_metadata
from sdv2_lab.io.synthetic import write_synthetic_clip

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 48  # what the dataset resizes to; the files are 48x64


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """a.mp4, b.mp4, sub/c.mp4 (9 frames, 48x64) and an unlisted extra.mp4."""
    root = tmp_path_factory.mktemp("videos")
    for name, seed in [("a.mp4", 0), ("b.mp4", 1), ("sub/c.mp4", 2), ("extra.mp4", 3)]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_clip(root / name, frames=9, height=48, width=64, fps=12, seed=seed)
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ---------------------------------------------------------------------------------------------------- prompts files
def test_csv_prompts_load_resized_frames(video_dir, tmp_path):
    prompts = write(tmp_path / "prompts.csv", '''
        path,prompt,category
        a.mp4,"a red fox, in snow",animals
        sub/c.mp4,a city at night,urban
    ''')
    ds = FolderDataset(video_dir, prompts, H, W, max_frames=5)
    assert [it.id for it in ds] == ["a.mp4", "sub/c.mp4"]  # extra.mp4 and b.mp4 are not listed: ignored
    item = ds[0]
    assert item.prompt == "a red fox, in snow" and item.fps == pytest.approx(12)
    assert item.meta["category"] == "animals" and item.meta["source_width"] == 64
    assert not item.loaded  # lazy
    frames = item.frames
    assert frames.shape == (3, 5, H, W) and frames.dtype == torch.float32
    assert frames.min() >= -1 and frames.max() <= 1 and item.meta["frames"] == 5


def test_jsonl_and_evaluation_json_forms(video_dir, tmp_path):
    jsonl = write(tmp_path / "prompts.jsonl", '''
        {"path": "a.mp4", "prompt": "first"}

        {"video": "b.mp4", "prompt": "second", "id": "clip_b"}
    ''')
    ds = FolderDataset(video_dir, jsonl, H, W)
    assert [(it.id, it.prompt) for it in ds] == [("a.mp4", "first"), ("clip_b", "second")]

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps([{"video": "sub/c.mp4", "prompt": "third"}, {"video": "a.mp4", "prompt": "x"}]))
    assert [(it.id, it.prompt) for it in FolderDataset(video_dir, evaluation, H, W)] == [("sub/c.mp4", "third"),
                                                                                        ("a.mp4", "x")]
    # JSON object {video: prompt}, and a prompts file named inside root
    (video_dir / "map.json").write_text(json.dumps({"b.mp4": "fourth"}))
    try:
        assert [it.prompt for it in FolderDataset(video_dir, "map.json", H, W)] == ["fourth"]
    finally:
        (video_dir / "map.json").unlink()


@pytest.mark.parametrize("name, text, match", [
    ("p.csv", "a.mp4,a prompt\n", r"p.csv line 1: a header naming columns 'path' \(or 'video'\) and 'prompt'"),
    ("p.csv", "path,prompt\na.mp4,one,two\n", r"p.csv line 2: more fields than the header"),
    ("p.csv", "path,prompt\n,orphan prompt\n", r"p.csv line 2: no value for 'path'"),
    ("p.jsonl", '{"path": "a.mp4", "prompt": "ok"}\n{"path": "b.mp4", \n', r"p.jsonl line 2: invalid JSON"),
    ("p.jsonl", '{"prompt": "no video"}\n', r"p.jsonl line 1: no value for 'path' \(or 'video'\)"),
    ("p.jsonl", '["a.mp4", "x"]\n', r"p.jsonl line 1: expected a JSON object"),
    ("evaluation.json", '[{"video": "a.mp4", "prompt": "ok"}, "b.mp4"]', r"evaluation.json entry 2: expected an object"),
    ("evaluation.json", '[{"video": "a.mp4", "prompt": 3}]', r"evaluation.json entry 1: 'prompt' must be a string"),
    ("evaluation.json", '{"video": [1, 2', r"evaluation.json line 1: invalid JSON"),
    ("p.csv", "path,prompt\n", r"p.csv: lists no videos"),
])
def test_bad_prompts_file_names_line_and_key(video_dir, tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    for on_error in ("raise", "skip"):  # a broken file is not one item: it fails in skip mode too
        with pytest.raises(PromptsFileError, match=match):
            FolderDataset(video_dir, path, H, W, on_error=on_error)


def test_missing_prompts_file_and_root(video_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file not found: .*nope.csv"):
        FolderDataset(video_dir, tmp_path / "nope.csv", H, W)
    with pytest.raises(FileNotFoundError, match="dataset root is not a folder"):
        FolderDataset(tmp_path / "no_such_dir", tmp_path / "nope.csv", H, W)
    with pytest.raises(ValueError, match="on_error must be one of"):
        FolderDataset(video_dir, tmp_path / "nope.csv", H, W, on_error="ignore")


# ---------------------------------------------------------------------------------------------------- item errors
@pytest.fixture()
def bad_folder(video_dir, tmp_path):
    """Prompts with: a good item, a missing file, a video without a prompt, a corrupt file, a truncated mp4,
    a duplicate, and another good item."""
    (video_dir / "corrupt.mp4").write_bytes(os.urandom(2048))
    good = (video_dir / "b.mp4").read_bytes()
    (video_dir / "truncated.mp4").write_bytes(good[: len(good) // 2])
    prompts = write(tmp_path / "prompts.csv", '''
        path,prompt
        a.mp4,good one
        missing.mp4,a prompt for a file that is not there
        b.mp4,
        corrupt.mp4,random bytes
        truncated.mp4,half a file
        a.mp4,listed again
        sub/c.mp4,good two
    ''')
    yield prompts
    (video_dir / "corrupt.mp4").unlink()
    (video_dir / "truncated.mp4").unlink()


@pytest.mark.parametrize("drop_before, exc, match", [
    (0, FileNotFoundError, r"item 'missing.mp4' \(prompts.csv line 3\): video file not found: .*missing.mp4"),
    (1, ValueError, r"item 'b.mp4' \(prompts.csv line 4\): video 'b.mp4' has no prompt"),
    (2, ValueError, r"item 'corrupt.mp4' \(prompts.csv line 5\): unreadable video"),
    (3, ValueError, r"item 'truncated.mp4' \(prompts.csv line 6\): unreadable video"),
    (4, ValueError, r"item 'a.mp4' \(prompts.csv line 7\): listed twice \(first at prompts.csv line 2\)"),
])
def test_each_item_error_names_the_item(video_dir, bad_folder, drop_before, exc, match):
    """raise mode stops at the first bad item: blank out the earlier bad rows (the reader skips blank lines, so
    line numbers stay put) to reach each bad row in turn."""
    lines = bad_folder.read_text().splitlines()
    earlier_bad = [2, 3, 4, 5, 6][:drop_before]  # 0-based lines of the bad rows before the one under test
    bad_folder.write_text("\n".join("" if i in earlier_bad else ln for i, ln in enumerate(lines)) + "\n")
    with pytest.raises(exc, match=match):
        FolderDataset(video_dir, bad_folder, H, W)


def test_skip_mode_records_every_bad_item(video_dir, bad_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="sdv2_lab.eval.datasets"):
        ds = FolderDataset(video_dir, bad_folder, H, W, on_error="skip")
    assert [it.id for it in ds] == ["a.mp4", "sub/c.mp4"]
    skipped = dict(ds.skipped)
    assert list(skipped) == ["missing.mp4", "b.mp4", "corrupt.mp4", "truncated.mp4", "a.mp4"]
    assert "not found" in skipped["missing.mp4"] and "no prompt" in skipped["b.mp4"]
    assert "unreadable" in skipped["corrupt.mp4"] and "listed twice" in skipped["a.mp4"]
    for item_id, _ in ds.skipped:
        assert item_id in caplog.text


def _fail_to_decode():
    raise ValueError("cannot decode video after 3 frames: invalid data")


def test_decode_failure_during_the_loop(video_dir, tmp_path, caplog):
    prompts = write(tmp_path / "p.csv", "path,prompt\na.mp4,one\nb.mp4,two\n")
    ds = FolderDataset(video_dir, prompts, H, W, on_error="skip")
    ds[0].loader = _fail_to_decode
    with caplog.at_level(logging.WARNING, logger="sdv2_lab.eval.datasets"):
        items = list(EvalDataModule(ds).test_dataloader())
    assert [it.id for it in items] == ["a.mp4", "b.mp4"]  # handed on, not dropped
    assert "cannot decode" in items[0].error and not items[0].loaded and items[1].loaded
    assert ds.skipped == [("a.mp4", items[0].error)] and "a.mp4" in caplog.text
    with pytest.raises(ValueError, match="was skipped"):
        items[0].frames

    strict = FolderDataset(video_dir, prompts, H, W)
    strict[0].loader = _fail_to_decode
    with pytest.raises(ValueError, match="item 'a.mp4': cannot decode .*a.mp4"):
        EvalDataset(strict)[0]


# ---------------------------------------------------------------------------------------------------- synthetic + build
def test_synthetic_dataset_is_deterministic_per_index():
    one = SyntheticDataset(3, 9, H, W, fps=16, seed=5, prompts=["p0", "p1"])
    two = SyntheticDataset(3, 9, H, W, fps=16, seed=5, prompts=["p0", "p1"])
    assert [it.prompt for it in one] == ["p0", "p1", "p0"]
    for i in range(3):
        assert torch.equal(one[i].frames, two[i].frames)
        assert one[i].meta["velocity"] == two[i].meta["velocity"]
        assert one[i].frames.shape == (3, 9, H, W)
        motion = one[i].meta["motion"]
        assert motion.shape == (9, 2) and torch.allclose(motion[1], torch.tensor(one[i].meta["velocity"]))
    assert not torch.equal(one[0].frames, one[1].frames)
    alone = SyntheticDataset(1, 9, H, W, seed=6, prompts=["p"])  # clip 1 of seed 5 == clip 0 of seed 6
    assert torch.equal(alone[0].frames, one[1].frames)


def test_build_dataset_from_conf():
    cfg = OmegaConf.load(REPO / "conf/dataset/synthetic.yaml")
    ds = build_dataset(cfg, H, W)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 2
    assert ds[0].frames.shape == (3, 33, H, W) and ds[0].fps == 16 and ds[0].prompt != ds[1].prompt
    with pytest.raises(ValueError, match=r"unknown dataset 'webvid'; valid: \['folder', 'synthetic'\]"):
        build_dataset({"name": "webvid"}, H, W)
    with pytest.raises(ValueError, match=r"dataset 'synthetic': unknown option\(s\) \['clips'\]"):
        build_dataset({"name": "synthetic", "clips": 3}, H, W)
    folder = OmegaConf.load(REPO / "conf/dataset/folder.yaml")
    assert folder.on_error == "raise" and folder.max_frames is None
    with pytest.raises(ValueError, match=r"dataset 'folder': missing required option\(s\) \['root', 'prompts_file'\]"):
        build_dataset(folder, H, W)


def test_build_folder_dataset_from_conf(video_dir, tmp_path):
    prompts = write(tmp_path / "p.jsonl", '{"path": "a.mp4", "prompt": "one"}\n')
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/dataset/folder.yaml"),
                          {"root": str(video_dir), "prompts_file": str(prompts), "max_frames": 4})
    ds = build_dataset(cfg, H, W)
    assert isinstance(ds, FolderDataset) and ds[0].frames.shape == (3, 4, H, W)


# ---------------------------------------------------------------------------------------------------- DataModule / DDP
def test_datamodule_yields_one_video_item_per_batch():
    dm = EvalDataModule({"name": "synthetic", "n": 3, "frames": 5}, height=H, width=W)
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        items = list(loader)
        assert [it.id for it in items] == ["synthetic_000", "synthetic_001", "synthetic_002"]
        assert all(isinstance(it, VideoItem) and it.loaded and it.frames.shape == (3, 5, H, W) for it in items)
    with pytest.raises(ValueError, match="needs height and width"):
        EvalDataModule({"name": "synthetic"})


def test_datamodule_with_a_worker_process(video_dir, tmp_path):
    prompts = write(tmp_path / "p.csv", "path,prompt\na.mp4,one\nb.mp4,two\n")
    dm = EvalDataModule(FolderDataset(video_dir, prompts, H, W, max_frames=3), num_workers=1)
    items = list(dm.test_dataloader())  # items (with their loaders) pickle to the worker; frames come back decoded
    assert [(it.id, it.loaded, tuple(it.frames.shape)) for it in items] == [("a.mp4", True, (3, 3, H, W)),
                                                                             ("b.mp4", True, (3, 3, H, W))]


def test_shard_sampler_splits_without_duplicates_or_padding():
    data = list(range(5))
    shards = [list(ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert [len(ShardSampler(data, 2, r)) for r in range(2)] == [3, 2]
    assert sorted(shards[0] + shards[1]) == data
    three = [i for r in range(3) for i in ShardSampler(data, 3, r)]
    assert sorted(three) == data
    assert list(ShardSampler(data[:1], 2, 1)) == []  # more ranks than items: a rank may get nothing
    assert isinstance(ShardSampler(data, 2, 0), DistributedSampler)  # so Lightning does not inject its own


def test_datamodule_under_two_fake_ranks():
    seen = []
    for rank in range(2):
        dm = EvalDataModule(SyntheticDataset(5, 5, H, W, prompts=["p"]))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen.append([it.id for it in dm.test_dataloader()])
    assert seen == [["synthetic_000", "synthetic_002", "synthetic_004"], ["synthetic_001", "synthetic_003"]]


def test_lightning_passes_items_through_unchanged():
    import lightning.pytorch as pl

    class Collect(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.seen = []

        def test_step(self, item, batch_idx):
            self.seen.append((item.id, tuple(item.frames.shape)))

        def predict_step(self, item, batch_idx):
            return item.id

    dm = EvalDataModule(SyntheticDataset(3, 5, H, W, prompts=["p"]))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    module = Collect()
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.seen == [(f"synthetic_00{i}", (3, 5, H, W)) for i in range(3)]
    assert trainer.predict(module, datamodule=dm) == ["synthetic_000", "synthetic_001", "synthetic_002"]


DDP_SCRIPT = """
import os, sys
import lightning.pytorch as pl
from sdv2_lab.eval.datamodule import EvalDataModule

class Record(pl.LightningModule):
    def _record(self, kind, item):
        with open(os.path.join(sys.argv[1], f"{kind}.rank{self.global_rank}"), "a") as f:
            f.write(item.id + "\\n")
    def test_step(self, item, batch_idx):
        self._record("test", item)
    def predict_step(self, item, batch_idx):
        self._record("predict", item)

if __name__ == "__main__":
    dm = EvalDataModule({"name": "synthetic", "n": 5, "frames": 5, "prompts": ["p"]}, height=32, width=48)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.test(Record(), datamodule=dm, verbose=False)
    trainer.predict(Record(), datamodule=dm, return_predictions=False)
"""


def test_real_ddp_run_sees_every_item_once(tmp_path):
    """Two CPU processes (gloo) under Lightning's default use_distributed_sampler=True: 5 items split 3 + 2,
    none repeated to even the ranks out, in trainer.test and trainer.predict."""
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("test", "predict"):
        shards = [(tmp_path / f"{kind}.rank{r}").read_text().split() for r in range(2)]
        assert shards == [["synthetic_000", "synthetic_002", "synthetic_004"], ["synthetic_001", "synthetic_003"]]


# ---------------------------------------------------------------------------------------------------- results
CRASHING_WRITER = """
import os, sys
from sdv2_lab.eval.results import ResultsWriter
w = ResultsWriter(sys.argv[1], context={"weights": "dummy"})
w.write({"video": "a", "fps": 10.5, "timing": {"p50_ms": 3.0}})
w.write({"video": "b", "fps": 11.0, "ttff_s": 0.4})
with open(w.jsonl_path, "a") as f:   # the process dies half way through a third row
    f.write('{"video": "c", "fp')
    f.flush()
os._exit(137)
"""


def test_results_survive_a_crash(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(run)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    with pytest.warns(UserWarning, match="truncated last line 3"):
        writer = ResultsWriter(run)  # a new instance in a new process
    rows = writer.rows()
    assert [r["video"] for r in rows] == ["a", "b"]
    assert rows[0] == {"weights": "dummy", "video": "a", "fps": 10.5, "timing.p50_ms": 3.0}
    csv = pd.read_csv(run / "results.csv")
    assert list(csv.columns) == ["weights", "video", "fps", "timing.p50_ms", "ttff_s"]  # union, first-seen order
    assert csv["fps"].tolist() == [10.5, 11.0] and pd.isna(csv.loc[0, "ttff_s"])
    # reopening cut the fragment off: the resumed run appends cleanly
    writer.write({"video": "c", "fps": 9.0})
    assert [r["video"] for r in writer.rows()] == ["a", "b", "c"]
    assert len((run / "results.jsonl").read_text().splitlines()) == 3
    assert pd.read_csv(run / "results.csv")["video"].tolist() == ["a", "b", "c"]


def test_reopening_keeps_a_complete_row_without_its_newline(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"video": "a", "fps": 1.0}\n{"video": "b", "fps": 2.0}')
    writer = ResultsWriter(tmp_path)
    assert pd.read_csv(tmp_path / "results.csv")["video"].tolist() == ["a", "b"]  # CSV rebuilt on reopening
    writer.write({"video": "c", "fps": float("nan")})
    assert [r["video"] for r in ResultsWriter(tmp_path).rows()] == ["a", "b", "c"]
    assert pd.read_json(tmp_path / "results.jsonl", lines=True)["video"].tolist() == ["a", "b", "c"]


def test_csv_is_replaced_atomically(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path)
    writer.write({"video": "a", "fps": 1.0})
    before = (tmp_path / "results.csv").read_text()

    def broken_to_csv(self, f, **kw):
        f.write("video,fps\nhalf")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(OSError, match="disk full"):
        writer.write({"video": "b", "fps": 2.0})
    assert (tmp_path / "results.csv").read_text() == before  # the old complete file, not a half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.jsonl"]  # no temp file left
    assert [r["video"] for r in writer.rows()] == ["a", "b"]  # the row itself was already safe in the JSONL


def test_summary_and_metadata(tmp_path):
    writer = ResultsWriter(tmp_path)
    path = writer.write_summary({"fps": {"mean": 12.5}, "videos": 2})
    assert json.loads(path.read_text()) == {"fps.mean": 12.5, "videos": 2} and path.name == "summary.json"
    meta = run_metadata()
    assert set(meta) >= {"gpu", "torch", "commit", "hostname", "time"}
    assert meta["gpu"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert meta["torch"] == torch.__version__
    assert meta["commit"] == "unknown" or len(meta["commit"]) >= 7
    assert _git_state(tmp_path) == ("unknown", None)  # not a repository


def make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2026-11-30" / "12-00-00"
    jobs = {"steps=1,vae=wan": (["steps=1", "vae=wan"], [{"video": "a", "fps": 20.0}, {"video": "b", "fps": 21.0}]),
            "steps=2,vae=taehv": (["steps=2", "vae=taehv", "+note=hello world"], [{"video": "a", "fps": 30.0, "steps": 2}])}
    for name, (overrides, rows) in jobs.items():
        job = sweep / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        w = ResultsWriter(job)
        for row in rows:
            w.write(row)
    with open(sweep / "steps=2,vae=taehv" / "results.jsonl", "a") as f:  # crashed mid-row
        f.write('{"video": "b", "fps": 3')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_gather_results_over_a_multirun(tmp_path):
    sweep = make_sweep(tmp_path)
    with pytest.warns(UserWarning, match="truncated last line 2"):
        df = gather_results(sweep)
    assert len(df) == 3
    assert df["job"].tolist() == ["steps=1,vae=wan", "steps=1,vae=wan", "steps=2,vae=taehv"]
    assert df["steps"].tolist() == [1, 1, 2] and df["vae"].tolist() == ["wan", "wan", "taehv"]
    assert df["fps"].tolist() == [20.0, 21.0, 30.0]
    assert df["note"].tolist()[2] == "hello world" and pd.isna(df["note"].tolist()[0])
    assert df.groupby("vae")["fps"].mean().to_dict() == {"taehv": 30.0, "wan": 20.5}
    with pytest.raises(FileNotFoundError, match="sweep folder not found"):
        gather_results(tmp_path / "nothing")


def test_results_command(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    out = tmp_path / "tables" / "all.csv"
    with pytest.warns(UserWarning):
        assert results_main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps=2,vae=taehv" in printed and f"wrote {out}" in printed
    assert pd.read_csv(out)["fps"].tolist() == [20.0, 21.0, 30.0]
    assert results_main([str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="no results"):
        assert results_main([str(tmp_path / "empty")]) == 1


def test_results_module_entry_point(tmp_path):
    sweep = make_sweep(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "sdv2_lab.eval.results", str(sweep)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "all_results.csv").is_file() and "truncated last line" in proc.stderr
