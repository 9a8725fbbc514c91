"""What a run reads: its prompt and its frames (a file, a generated clip, or none for text-to-video), checked
before any model is built; and how many frames the output will have."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig



def read_prompt(cfg: DictConfig) -> str:
    prompt = cfg.input.get("prompt")
    pfile = cfg.input.get("prompt_file")
    if pfile:
        path = Path(pfile).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"input.prompt_file {path} not found (relative paths are taken from {Path.cwd()})")
        from .io.text import read_text
        lines = [ln.strip() for ln in read_text(path, "input.prompt_file").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"input.prompt_file {path} is empty: write the prompt on its first line")
        prompt = lines[0]  # as the reference: the first line
    if not prompt or not str(prompt).strip():
        raise ValueError("no prompt: set input.prompt=... or input.prompt_file=...")
    return str(prompt)


def first_chunk_frames(cfg: DictConfig) -> int:
    """Input frames of a stream's first chunk, as the pipeline config derives them from the recipe."""
    from .settings import pipeline_config
    return pipeline_config(cfg).first_chunk_frames


def expected_output_frames(input_frames: int, cfg: DictConfig) -> Optional[int]:
    """Frames a clip of ``input_frames`` makes (whole chunks; the rest is dropped), None when unknown."""
    from .settings import pipeline_config
    pcfg = pipeline_config(cfg)
    first, per_chunk = pcfg.first_chunk_frames, pcfg.chunk_frames
    if not input_frames or input_frames < first:
        return None
    return first + per_chunk * ((input_frames - first) // per_chunk)


def input_frames(cfg: DictConfig):
    """(frames or an iterator of frames [3, t, H, W] in [-1, 1], input fps, description, frame count or 0).
    A missing, unreadable, still-image or too-short input fails here, before any model is built."""
    if cfg.t2v:
        return None, float(cfg.fps), "text-to-video", int(cfg.num_frames)
    if cfg.input.kind == "synthetic":
        from .io.synthetic import synthetic_clip
        n = int(cfg.input.frames)
        if n < first_chunk_frames(cfg):
            raise ValueError(f"input.frames={n}: the first chunk needs {first_chunk_frames(cfg)} frames")
        video, _ = synthetic_clip(n, cfg.height, cfg.width, seed=cfg.seed)
        return video, float(cfg.input.fps), f"synthetic clip ({n} frames)", n
    from .io.video import iter_video_frames, probe_video
    info = probe_video(cfg.input.video)
    info.check_length(first_chunk_frames(cfg), "input.video")
    limit = cfg.input.get("max_frames")
    count = min(info.frames, limit) if limit and info.frames else (limit or info.frames)
    frames = iter_video_frames(cfg.input.video, height=cfg.height, width=cfg.width, max_frames=limit, batch=4)
    desc = f"{cfg.input.video} ({info.frames or 'unknown number of'} frames at {info.fps:.1f} fps)"
    return _until_damaged(frames), info.fps, desc, count


class _Damage:
    """An input cut short, in the process where ``run_checked`` runs: its stream ends at the cut and the error
    waits there to be reported. Anywhere else (a pipe rank, the API) the error is raised as it comes."""
    owner: Optional[int] = None
    errors: list = []


def _until_damaged(frames):
    """A file's frames up to where they stop decoding: the stream ends there, so that the pipeline flushes and
    the output is written with what was made; the error is reported after (``run_checked``)."""
    import os

    from .io.video import VideoDecodeError
    try:
        yield from frames
    except VideoDecodeError as exc:
        if _Damage.owner != os.getpid():
            raise
        _Damage.errors.append(exc)


def damage_reported_here():
    """``with damage_reported_here() as errors:`` an input cut short ends its stream at the cut in this process,
    and its error is appended to ``errors`` (to be reported after the output is written) instead of raised."""
    import contextlib
    import os

    @contextlib.contextmanager
    def scope():
        _Damage.owner, _Damage.errors = os.getpid(), []
        try:
            yield _Damage.errors
        finally:
            _Damage.owner = None
    return scope()
