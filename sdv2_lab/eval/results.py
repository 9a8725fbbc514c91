"""Results files that pandas reads and that a crash cannot corrupt.

``results.jsonl`` in a run folder is the source of truth: one flat row per video, appended and fsync'ed as soon
as it is measured. ``results.csv`` beside it is rewritten whole (temporary file + ``os.replace``) after every
row, so it is always complete or the previous complete version. ``gather_results`` joins the rows of every job
of a Hydra multirun into one DataFrame, with the job's overrides as columns:

    python -m sdv2_lab.eval.results multirun/2026-11-30/12-00-00 --out all.csv
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import pandas as pd

from ..io.files import publish


# ---------------------------------------------------------------------------------------------------- rows
def flatten_row(row: Mapping, prefix: str = "") -> dict:
    """Nested mappings to dotted keys ({"vae": {"name": "wan"}} -> {"vae.name": "wan"}), values to JSON types."""
    flat: dict = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_row(dict(value.items()), prefix=f"{name}."))
        else:
            flat[name] = _jsonable(value)
    return flat


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars; 0-d ones become plain numbers
        return _jsonable(value.tolist())
    return str(value)


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over ``path`` (with the mode the
    umask gives, like any new file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a results JSONL. A truncated last line (a crash mid-write) is ignored with a warning, and so is
    any other unparseable line (named by its number)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    ends_cleanly = lines[-1] == ""
    if ends_cleanly:
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
        except ValueError as exc:
            last = n == len(lines)
            what = "truncated last line" if last and not ends_cleanly else "malformed line"
            warnings.warn(f"{path}: ignoring {what} {n} ({exc}): {line[:80]!r}", stacklevel=2)
            continue
        rows.append(row)
    return rows


class ResultsWriter:
    """Per-video rows of one run: ``write(row)`` appends to ``<name>.jsonl`` (flush + fsync) and rewrites
    ``<name>.csv`` atomically; columns are the union of all rows' keys in first-seen order. ``context`` (e.g.
    ``run_metadata()`` plus weights and overrides) is added to every row; a row's own keys win. Reopening a run
    folder appends to the rows already there. Several processes (DDP ranks) need different ``name``s
    (``results.rank1``); ``gather_results`` reads every ``results*.jsonl``. A fragment left by a crash in the
    middle of a row is reported and cut off when the folder is reopened."""

    def __init__(self, run_dir: str | Path, name: str = "results", context: Optional[Mapping] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / f"{name}.jsonl"
        self.csv_path = self.run_dir / f"{name}.csv"
        self.summary_path = self.run_dir / ("summary.json" if name == "results" else f"{name}.summary.json")
        self.context = flatten_row(context or {})
        self._rows = read_jsonl(self.jsonl_path) if self.jsonl_path.exists() else []
        self._end_partial_line()
        if self._rows:  # a crash between the JSONL append and the CSV rewrite: bring the CSV up to date
            self._write_csv()

    def _end_partial_line(self) -> None:
        """After a crash mid-row the file ends without a newline. A complete row only lacks its newline: add it.
        A fragment (``read_jsonl`` has just warned about it) is cut off, so that later reads are clean."""
        if not self.jsonl_path.exists():
            return
        data = self.jsonl_path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            complete = isinstance(json.loads(data[cut:]), dict)
        except ValueError:
            complete = False
        with open(self.jsonl_path, "r+b") as f:
            if complete:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def write(self, row: Mapping) -> dict:
        flat = {**self.context, **flatten_row(row)}
        line = json.dumps(flat, ensure_ascii=False, allow_nan=True)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._rows.append(json.loads(line))
        self._write_csv()
        return flat

    def rows(self) -> list[dict]:
        return read_jsonl(self.jsonl_path) if self.jsonl_path.exists() else []

    def dataframe(self) -> pd.DataFrame:
        return _frame(self.rows())

    def _write_csv(self) -> None:
        frame = _frame(self._rows)
        write_atomic(self.csv_path, lambda f: frame.to_csv(f, index=False))

    def write_summary(self, summary: Mapping) -> Path:
        data = flatten_row(summary) if summary else {}
        write_atomic(self.summary_path, lambda f: json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=True))
        return self.summary_path


def _frame(rows: list[dict]) -> pd.DataFrame:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    cells = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows]
    return pd.DataFrame(cells, columns=list(columns))


# ---------------------------------------------------------------------------------------------------- metadata
def run_metadata() -> dict:
    """Where and with what a number was measured: GPU name ("cpu" without CUDA), torch and CUDA versions, the
    short git commit of this source tree ("unknown" outside a repository) and whether it has local changes,
    host name and the UTC time."""
    import torch
    on_gpu = torch.cuda.is_available()
    commit, dirty = _git_state(Path(__file__).resolve().parent)
    return {
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "gpu_count": torch.cuda.device_count() if on_gpu else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "commit": commit,
        "commit_dirty": dirty,
        "hostname": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_state(where: Path) -> tuple[str, Optional[bool]]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ---------------------------------------------------------------------------------------------------- sweeps
def parse_overrides(lines: Iterable[str]) -> dict:
    """Hydra override strings to {key: value}: "steps=2" -> {"steps": 2}, "+vae.dim=16" -> {"vae.dim": 16};
    deletions ("~key") are skipped. Values are parsed as YAML (numbers, booleans, null), lists kept as text."""
    import yaml
    parsed = {}
    for text in lines:
        text = str(text).strip()
        if not text or text.startswith("~") or "=" not in text:
            continue
        key, raw = text.split("=", 1)
        key = key.lstrip("+")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        parsed[key] = value if value is None or isinstance(value, (bool, int, float, str)) else raw
    return parsed


def _job_overrides(job_dir: Path, sweep_dir: Path) -> dict:
    import yaml
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as exc:
        warnings.warn(f"{path}: unreadable overrides ({exc}); its job gets no override columns", stacklevel=3)
        return {}
    if not isinstance(data, list):
        warnings.warn(f"{path}: expected a list of overrides, got {type(data).__name__}", stacklevel=3)
        return {}
    return parse_overrides(data)


def gather_results(sweep_dir: str | Path) -> pd.DataFrame:
    """All rows of all jobs under a Hydra multirun folder (each job folder: ``results*.jsonl`` and
    ``.hydra/overrides.yaml``), with a ``job`` column (the job folder relative to ``sweep_dir``) and one column
    per override key where the row does not have that key already. Half-written jobs contribute the rows they
    finished (a truncated last line is ignored with a warning)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    files = sorted(p for p in sweep_dir.rglob("results*.jsonl") if p.is_file())
    if not files:
        warnings.warn(f"no results*.jsonl under {sweep_dir}", stacklevel=2)
    rows, override_keys = [], {}
    for path in files:
        job_dir = path.parent
        job = job_dir.relative_to(sweep_dir).as_posix()
        overrides = _job_overrides(job_dir, sweep_dir)
        override_keys.update(dict.fromkeys(overrides))
        for row in read_jsonl(path):
            rows.append({"job": job, **row, **{k: v for k, v in overrides.items() if k not in row}})
    frame = _frame(rows)
    frame.attrs["override_keys"] = list(override_keys)
    return frame


# ---------------------------------------------------------------------------------------------------- reading
CONFIG_COLUMNS = ["backbone", "vae_config", "attention", "mode", "steps", "height", "width", "num_kv_cache",
                  "kv_cache_dtype", "weights", "dataset", "gpu"]
KEY_MEASURES = ["e2e_fps", "steady_fps", "ttff_s", "latency_p95_ms", "dit_fps", "mfu", "peak_gpu_mem_gib",
                "warp_error_float", "ssim", "psnr", "lpips", "clip_score"]


def compact_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (job): what differs between the runs (overrides, configuration), how many videos finished
    and were skipped, and the mean of the key measures over the finished videos."""
    if "job" not in frame:
        frame = frame.assign(job=".")
    status = frame["status"] if "status" in frame else pd.Series("ok", index=frame.index)
    keys = [c for c in dict.fromkeys([*frame.attrs.get("override_keys", []), *CONFIG_COLUMNS]) if c in frame]
    varying = [c for c in keys if frame.groupby("job")[c].first().astype(str).nunique() > 1]
    rows = []
    for job, rows_of_job in frame.groupby("job", sort=False):
        ok = rows_of_job[status.loc[rows_of_job.index] == "ok"]
        row = {"job": job, **{c: rows_of_job[c].iloc[0] for c in varying},
               "videos": len(ok), "skipped": int((status.loc[rows_of_job.index] == "skipped").sum())}
        for c in KEY_MEASURES:
            if c in frame:
                values = pd.to_numeric(ok[c], errors="coerce")
                row[c] = float(values.mean()) if values.notna().any() else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    measured = [c for c in KEY_MEASURES if c in table and table[c].notna().any()]
    return table[[c for c in table.columns if c not in KEY_MEASURES or c in measured]]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdv2_lab.eval.results",
                                description="Join the results rows of a Hydra multirun into one table: prints one "
                                            "row per run (key columns), writes every column to a CSV.")
    p.add_argument("sweep_dir", help="the multirun folder (or a single run folder)")
    p.add_argument("--out", default=None, help="CSV to write (default: <sweep_dir>/all_results.csv); a Parquet "
                                               "file with the same stem is written too when pyarrow is installed")
    a = p.parse_args(argv)
    return report(a.sweep_dir, a.out)


def report(sweep_dir: str | Path, out: Optional[str | Path] = None) -> int:
    """Print the compact table of a sweep (one row per run) and write every column to ``out`` (default
    ``<sweep_dir>/all_results.csv``, and a Parquet file beside it with pyarrow). Returns an exit code: 0, 1 when
    there are no rows, 2 when the folder is missing. ``python -m sdv2_lab.eval.results`` and the end of every
    ``sdv2 eval -m`` sweep (``eval/sweep.py``) print this."""
    try:
        frame = gather_results(sweep_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if frame.empty:
        print(f"error: no results rows under {sweep_dir}", file=sys.stderr)
        return 1
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 30,
                           "display.float_format", "{:.3f}".format):
        print(compact_table(frame).to_string(index=False))
    out = Path(out) if out else Path(sweep_dir) / "all_results.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: frame.to_csv(f, index=False))
    print(f"wrote {out}: every column ({len(frame)} rows, one per video; {len(frame.columns)} columns)")
    if importlib.util.find_spec("pyarrow") is not None:
        parquet = out.with_suffix(".parquet")
        try:
            frame.to_parquet(parquet, index=False)
            print(f"wrote {parquet}")
        except Exception as exc:  # mixed-type columns, etc.: the CSV is already written
            print(f"warning: no Parquet file ({exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
