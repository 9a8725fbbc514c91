"""(video, prompt) items for the evaluation loop: a folder of videos with a prompts file, or generated clips.

Sources (``FolderDataset``, ``SyntheticDataset``) are plain sequences of ``VideoItem``s whose frames load on
first use. ``build_dataset`` makes one from a ``conf/dataset`` mapping; ``datamodule.EvalDataModule`` serves
them to Lightning one item per batch.

Failures never vanish. With ``on_error="raise"`` a bad item stops the run with an error naming it. With
``on_error="skip"`` the item goes to ``dataset.skipped`` as ``(id, reason)`` and is logged. An item whose
frames fail to decode only when the loop reaches it is still handed to the loop, with ``item.error`` set and
no frames, so that the harness writes a "skipped" row for it. (With ``num_workers > 0`` the decode happens in
a worker process, whose ``skipped`` list the main process never sees: ``item.error`` is the record.)
"""
from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from ..io.synthetic import synthetic_clip
from ..registry import Registry
from ..io.video import load_video, probe_video

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
SKIP_HINT = "dataset.on_error=skip records such a video as skipped and goes on"
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif"}


# ---------------------------------------------------------------------------------------------------- items
@dataclass
class VideoItem:
    """One evaluation clip. ``frames`` ([3, T, H, W] float32 in [-1, 1]) is produced by ``loader`` on first
    access; ``loader`` returns (frames, extra meta), e.g. the known motion of a synthetic clip."""
    id: str
    prompt: str
    path: Optional[str] = None
    fps: float = 16.0
    meta: dict = field(default_factory=dict)
    loader: Optional[Callable[[], tuple[torch.Tensor, dict]]] = field(default=None, repr=False, compare=False)
    error: Optional[str] = None
    _frames: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    @property
    def frames(self) -> torch.Tensor:
        if self._frames is None:
            if self.error is not None:
                raise ValueError(f"item {self.id!r} was skipped: {self.error}")
            if self.loader is None:
                raise ValueError(f"item {self.id!r} has neither frames nor a loader")
            frames, extra = self.loader()
            self._frames = frames
            self.meta.update(extra)
        return self._frames

    @property
    def loaded(self) -> bool:
        return self._frames is not None

    def load(self) -> "VideoItem":
        self.frames  # noqa: B018  (the property loads)
        return self


def _load_file(path: str, height: int, width: int, max_frames: Optional[int]) -> tuple[torch.Tensor, dict]:
    frames = load_video(path, height=height, width=width, max_frames=max_frames)
    return frames, {"frames": frames.shape[1]}


def _make_synthetic(frames: int, height: int, width: int, velocity: tuple[float, float],
                    seed: int) -> tuple[torch.Tensor, dict]:
    video, motion = synthetic_clip(frames, height, width, velocity=velocity, seed=seed)
    return video, {"frames": frames, "motion": motion}


class _Source:
    """A sequence of ``VideoItem``s with a ``skipped`` record."""
    on_error = "raise"

    def __init__(self):
        self.items: list[VideoItem] = []
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> VideoItem:
        return self.items[i]

    def __iter__(self) -> Iterator[VideoItem]:
        return iter(self.items)

    def _fail(self, item_id: str, reason: str, exc_type=ValueError, cause: Optional[BaseException] = None):
        """Raise, or record and log the skip (``on_error``)."""
        if self.on_error == "raise":
            raise exc_type(f"{reason} ({SKIP_HINT})") from cause
        self.skipped.append((item_id, reason))
        log.warning("dataset: skipping %s: %s", item_id, reason)


# ---------------------------------------------------------------------------------------------------- prompts files
@dataclass
class PromptEntry:
    path: str
    prompt: Optional[str]
    where: str                      # "prompts.csv line 3": for error messages
    item_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


class PromptsFileError(ValueError):
    """The prompts file itself is malformed (not one item: the whole file)."""


def read_prompts_file(path: str | Path) -> list[PromptEntry]:
    """CSV (header with ``path`` or ``video``, and ``prompt``), JSONL (one object a line, ``path``/``video`` and
    ``prompt``) or the paper's ``evaluation.json`` (a JSON list of ``{"video", "prompt"}``, or a JSON object
    mapping video to prompt). Chosen by extension (.csv, .jsonl, .json), else by the first character."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path} (dataset.prompts_file)")
    from ..io.text import read_text
    text = read_text(path, "dataset.prompts_file").lstrip("\ufeff")
    suffix = path.suffix.lower()
    first = text.lstrip()[:1]
    if suffix == ".csv":
        entries = _read_csv(path, text)
    elif suffix in (".jsonl", ".ndjson"):
        entries = _read_jsonl(path, text)
    elif suffix == ".json" or first in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if first != "{":
                raise PromptsFileError(f"dataset.prompts_file {path} line {exc.lineno}: invalid JSON ({exc.msg})") \
                    from exc
            entries = _read_jsonl(path, text)  # several objects, one per line: JSONL under another name
        else:
            entries = _read_json(path, data)
    else:
        entries = _read_csv(path, text)
    if not entries:
        raise PromptsFileError(f"{path.name}: lists no videos")
    return entries


def _entry(obj: Mapping, where: str, name: str) -> PromptEntry:
    video = obj.get("path", obj.get("video"))
    if video is None or (isinstance(video, str) and not video.strip()):
        raise PromptsFileError(f"{name} {where}: no value for 'path' (or 'video'); keys: {sorted(obj)}")
    if not isinstance(video, str):
        raise PromptsFileError(f"{name} {where}: 'path'/'video' must be a string, got {video!r}")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise PromptsFileError(f"{name} {where}: 'prompt' must be a string, got {prompt!r}")
    item_id = obj.get("id")
    extra = {k: v for k, v in obj.items() if k not in ("path", "video", "prompt", "id")}
    return PromptEntry(video.strip(), prompt, f"{name} {where}", None if item_id is None else str(item_id), extra)


def _read_csv(path: Path, text: str) -> list[PromptEntry]:
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not ({"path", "video"} & set(header)) or "prompt" not in header:
        raise PromptsFileError(f"{path.name} line 1: a header naming columns 'path' (or 'video') and 'prompt' is "
                               f"required, got {header}")
    reader.fieldnames = header
    entries = []
    for row in reader:
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # blank line
        if None in row:
            raise PromptsFileError(f"{path.name} line {reader.line_num}: more fields than the header's "
                                   f"{len(header)} (quote prompts that contain commas)")
        entries.append(_entry({k: v for k, v in row.items() if v is not None}, f"line {reader.line_num}", path.name))
    return entries


def _read_jsonl(path: Path, text: str) -> list[PromptEntry]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsFileError(f"dataset.prompts_file {path} line {n}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise PromptsFileError(f"{path.name} line {n}: expected a JSON object, got {type(obj).__name__}")
        entries.append(_entry(obj, f"line {n}", path.name))
    return entries


def _read_json(path: Path, data: Any) -> list[PromptEntry]:
    if isinstance(data, dict):  # {"video.mp4": "prompt", ...}
        return [PromptEntry(str(k), v if isinstance(v, str) else None, f"{path.name} key {k!r}") for k, v in data.items()]
    if not isinstance(data, list):
        raise PromptsFileError(f"{path.name}: expected a JSON list of {{'video', 'prompt'}} objects, "
                               f"got {type(data).__name__}")
    entries = []
    for n, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise PromptsFileError(f"{path.name} entry {n}: expected an object, got {type(obj).__name__}")
        entries.append(_entry(obj, f"entry {n}", path.name))
    return entries


# ---------------------------------------------------------------------------------------------------- sources
class FolderDataset(_Source):
    """Videos under ``root`` listed in ``prompts_file`` (paths relative to ``root``). Videos in the folder that
    the prompts file does not list are ignored; a listed video that is missing or unreadable, or listed without
    a prompt, is an error naming the item (or a recorded skip with ``on_error="skip"``). A malformed prompts
    file (``PromptsFileError``, naming the line or key) fails in either mode: it is not one item's problem.
    Files are probed here; frames are decoded and resized to ``height`` × ``width`` when first used."""

    def __init__(self, root: str | Path, prompts_file: str | Path, height: int, width: int,
                 max_frames: Optional[int] = None, on_error: str = "raise"):
        super().__init__()
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if root is None or not str(root).strip():
            raise ValueError("dataset.root is empty: give dataset.root=<the folder of videos>")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "a file" if self.root.exists() else "not found"
            raise FileNotFoundError(f"dataset root is not a folder: {root} ({what}; dataset.root, relative paths are "
                                    f"taken from {Path.cwd()})")
        self.prompts_file = self._resolve_prompts_file(prompts_file)
        self.height, self.width, self.max_frames, self.on_error = height, width, max_frames, on_error
        seen: dict[str, str] = {}
        entries = read_prompts_file(self.prompts_file)
        for entry in entries:
            item = self._make_item(entry, seen)
            if item is not None:
                self.items.append(item)
        self._report_unlisted({(self.root / e.path).resolve() for e in entries})

    def _resolve_prompts_file(self, prompts_file) -> Path:
        p = Path(prompts_file)
        if p.is_absolute() or p.exists():
            return p
        return self.root / p  # relative names are looked up beside the videos; the reader reports a miss

    def _make_item(self, entry: PromptEntry, seen: dict[str, str]) -> Optional[VideoItem]:
        item_id = entry.item_id or entry.path
        label = f"item {item_id!r} ({entry.where})"
        if item_id in seen:
            return self._fail(item_id, f"{label}: listed twice (first at {seen[item_id]})")
        seen[item_id] = entry.where
        if entry.prompt is None or not entry.prompt.strip():
            return self._fail(item_id, f"{label}: video {entry.path!r} has no prompt")
        video_path = self.root / entry.path
        if not video_path.is_file():
            return self._fail(item_id, f"{label}: video file not found: {video_path}", FileNotFoundError)
        try:
            info = probe_video(video_path)
        except Exception as exc:  # PyAV raises many types; all mean "cannot use this file"
            reason = str(exc).replace(f"cannot read video {video_path}: ", "")
            return self._fail(item_id, f"{label}: unreadable video {video_path}: {reason}", ValueError, exc)
        if info.is_image:  # said now, by name, not as a short clip when the loop reaches it
            return self._fail(item_id, f"{label}: {video_path} is a single image ({info.codec or info.container}), "
                                       f"not a video")
        meta = dict(entry.extra, source_height=info.height, source_width=info.width, source_frames=info.frames)
        loader = functools.partial(_load_file, str(video_path), self.height, self.width, self.max_frames)
        return VideoItem(id=item_id, prompt=entry.prompt.strip(), path=str(video_path), fps=info.fps, meta=meta,
                         loader=loader)

    def _report_unlisted(self, listed: set[Path]) -> None:
        unlisted = [p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.resolve() not in listed]
        if unlisted:
            log.info("dataset: %d video(s) under %s are not in %s and are ignored (e.g. %s)", len(unlisted),
                     self.root, self.prompts_file.name, unlisted[0].relative_to(self.root))


class SyntheticDataset(_Source):
    """``n`` generated clips (``io.synthetic``: a textured square moving over a gradient). Clip ``i`` uses seed
    ``seed + i`` for its texture and a velocity drawn from the same seed, so every clip is reproducible alone;
    ``meta["velocity"]`` and (once loaded) ``meta["motion"]`` hold the true motion."""

    def __init__(self, n: int = 2, frames: int = 17, height: int = 64, width: int = 96, fps: float = 16.0,
                 seed: int = 0, prompts: Sequence[str] = ("a watercolor painting of a moving red square",),
                 min_frames: int = 1):
        super().__init__()
        if n < 1 or frames < max(1, min_frames):
            raise ValueError(f"synthetic dataset needs n >= 1 and frames >= {max(1, min_frames)} (the first chunk), "
                             f"got n={n}, frames={frames}")
        if not prompts:
            raise ValueError("synthetic dataset needs at least one prompt")
        for i in range(n):
            g = torch.Generator().manual_seed(seed + i)
            vy, vx = (torch.rand(2, generator=g) * torch.tensor([4.0, 2.5]) + torch.tensor([-2.0, 0.5])).tolist()
            velocity = (round(vy, 2), round(vx, 2))
            loader = functools.partial(_make_synthetic, frames, height, width, velocity, seed + i)
            self.items.append(VideoItem(id=f"synthetic_{i:03d}", prompt=str(prompts[i % len(prompts)]), fps=float(fps),
                                        meta={"seed": seed + i, "velocity": velocity}, loader=loader))


# ---------------------------------------------------------------------------------------------------- registry
DATASETS: Registry[Callable[..., _Source]] = Registry("dataset")


def register_dataset(name: str) -> Callable:
    """``@register_dataset("name")`` on ``builder(height, width, **options)``; ``options`` are conf/dataset keys."""
    return DATASETS.register(name)


registered_datasets = DATASETS.names


@register_dataset("synthetic")
def _build_synthetic(height: int, width: int, *, n: int = 2, frames: int = 17, fps: float = 16.0, seed: int = 0,
                     prompts: Sequence[str] = ("a watercolor painting of a moving red square",),
                     min_frames: int = 1) -> SyntheticDataset:
    return SyntheticDataset(n, frames, height, width, fps, seed, list(prompts), min_frames=min_frames)


@register_dataset("folder")
def _build_folder(height: int, width: int, *, root: str, prompts_file: str, max_frames: Optional[int] = None,
                  on_error: str = "raise") -> FolderDataset:
    return FolderDataset(root, prompts_file, height, width, max_frames=max_frames, on_error=on_error)


CONTEXT = ("min_frames",)  # builder keywords set by the run (not conf/dataset options)


def build_dataset(cfg: Mapping, height: int, width: int, min_frames: int = 1):
    """A source from a ``conf/dataset`` mapping: ``name`` picks the builder, the other keys are its options.
    ``min_frames``: the first chunk's frames; builders that take it refuse fewer (the synthetic source)."""
    options = _plain(cfg)
    if not isinstance(options, Mapping):
        raise TypeError(f"dataset config must be a mapping with a 'name', got {type(cfg).__name__}")
    options = dict(options)
    name = options.pop("name", None)
    builder = DATASETS.get(name)
    params = inspect.signature(builder).parameters
    accepted = [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY and p not in CONTEXT]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown option(s) {unknown}; valid: {accepted}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and options.get(p) in (None, "???")]
    if missing:
        raise ValueError(f"dataset {name!r}: missing required option(s) {missing}: give "
                         + " and ".join(f"dataset.{p}=..." for p in missing)
                         + (" (dataset.root: the folder of videos; dataset.prompts_file: a CSV, JSONL or JSON list "
                            "of video and prompt)" if name == "folder" else ""))
    context = {"min_frames": min_frames} if "min_frames" in params else {}
    return builder(height, width, **options, **context)


def _plain(value):
    """An OmegaConf node to plain Python; mandatory values left unset stay "???" (reported as missing)."""
    from omegaconf import OmegaConf
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    return value


# ---------------------------------------------------------------------------------------------------- torch / Lightning
class EvalDataset(Dataset):
    """A source as a ``torch.utils.data.Dataset``: ``__getitem__`` returns the item with its frames decoded (in
    the worker, when there are workers). A decode failure under ``on_error="skip"`` returns the item with
    ``error`` set and no frames (see the module docstring)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> VideoItem:
        item = self.source[i]
        if item.loaded or item.error is not None:
            return item
        try:
            return item.load()
        except Exception as exc:
            reason = f"item {item.id!r}: cannot decode {item.path or 'frames'}: {exc}"
            if getattr(self.source, "on_error", "raise") != "skip":
                raise ValueError(f"{reason} ({SKIP_HINT})") from exc
            item.error = reason
            self.source.skipped.append((item.id, reason))
            log.warning("dataset: skipping %s", reason)
            return item


class ShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets items ``r, r + W, r + 2W, ...``: every item exactly once over all ranks, in
    order, with **no padding** (``DistributedSampler`` would repeat items to even the ranks out, and the repeats
    would count twice in the results). Ranks may get unequal counts (5 over 2: 3 and 2), so the evaluation step
    must not run per-item collectives (e.g. ``self.log(..., sync_dist=True)``); reduce once at the end. Being a
    ``DistributedSampler``, Lightning keeps it instead of injecting its own."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), num_replicas))
        self.num_samples = len(self.indices)
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def single_item(batch: list[VideoItem]) -> VideoItem:
    """collate_fn for batch_size 1: the VideoItem itself, unbatched and unchanged."""
    if len(batch) != 1:
        raise ValueError(f"evaluation batches hold one item, got {len(batch)}")
    return batch[0]
