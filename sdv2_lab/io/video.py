"""Video files in and out: decode anything ffmpeg reads (PyAV), resize with antialiasing, write H.264 mp4.

Writes are atomic: frames go to a temporary file beside the target, renamed into place only when complete,
so a failed run never leaves a half-written video (nor the temporary file). Outputs get the mode the umask gives.
Reading says, in one log line per file, what was done to its frames (resized, alpha dropped, grayscale made RGB).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .files import check_output_file, publish

log = logging.getLogger(__name__)
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif")

@dataclass
class VideoInfo:
    path: str
    fps: float
    frames: int          # 0 when the container does not say
    height: int
    width: int
    container: str = ""  # the demuxer's name (mov,mp4,..., png_pipe, image2, ...)
    codec: str = ""

    @property
    def is_image(self) -> bool:
        """A still image (png, jpeg, ...) rather than a video; a one-frame GIF counts as an image too."""
        return self.container in IMAGE_FORMATS and self.frames <= 1

    def check_length(self, needed: int, flag: str = "the input video") -> None:
        """Refuse, naming the file, a still image or a clip shorter than the first chunk (``needed`` frames)."""
        if self.is_image:
            raise ValueError(f"{flag} {self.path} is a single image ({self.codec or self.container}), not a video: "
                             f"give a video of at least {needed} frames")
        if self.frames == 1:
            raise ValueError(f"{flag} {self.path} is a one-frame video ({self.codec or self.container}); the first "
                             f"chunk needs {needed} frames (the recipe's first chunk): give a longer video")
        if 0 < self.frames < needed:
            raise ValueError(f"{flag} {self.path} has {self.frames} frame(s); the first chunk needs {needed} "
                             f"(the recipe's first chunk): give a longer video")


class VideoDecodeError(ValueError):
    """A video whose frames stop decoding part-way (a file cut short or damaged): names the file and the
    frame. ``decoded``: the frames read before it; ``frames``: what the header announced (0: unknown)."""

    def __init__(self, path, decoded: int, frames: int, reason: str):
        self.path, self.decoded, self.frames, self.reason = str(path), decoded, frames, reason
        of = f" of {frames}" if frames else ""
        super().__init__(f"video {path}: frame {decoded + 1}{of} cannot be decoded ({reason}): the file is cut "
                         f"short or damaged (the {decoded} frame(s) before it decode)")


def _reason(exc: BaseException) -> str:
    """PyAV's message without its errno and C function ("Invalid data found when processing input")."""
    text = str(getattr(exc, "strerror", None) or exc)
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text).split(": '")[0].strip() or type(exc).__name__


def _open(path):
    import av
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a video file: {path}")
    try:
        return av.open(str(path))
    except Exception as exc:  # PyAV raises several error types for unreadable input
        raise ValueError(f"cannot read video {path}: {_reason(exc)}") from exc


def probe_video(path) -> VideoInfo:
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        s = container.streams.video[0]
        fps = float(s.average_rate) if s.average_rate else 16.0
        return VideoInfo(str(path), fps, int(s.frames or 0), s.codec_context.height, s.codec_context.width,
                         container=container.format.name, codec=s.codec_context.name)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, h, w] float -> [T, 3, height, width], bilinear with antialiasing (exact size, as the reference)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def iter_video_frames(path, *, height: Optional[int] = None, width: Optional[int] = None,
                      max_frames: Optional[int] = None, batch: int = 1) -> Iterator[torch.Tensor]:
    """Yield [3, t, H, W] float32 in [-1, 1] (t <= batch) without decoding the whole file first."""
    container = _open(path)
    try:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        buf, n = [], 0
        try:
            for frame in container.decode(video=0):
                if n == 0:
                    _log_conversion(path, frame, height, width)
                buf.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                n += 1
                if len(buf) == batch or (max_frames is not None and n >= max_frames):
                    yield _to_model_range(buf, height, width)
                    buf = []
                if max_frames is not None and n >= max_frames:
                    break
        except Exception as exc:   # PyAV's errors (some are ValueErrors) name neither the file nor the frame
            raise VideoDecodeError(path, n, int(stream.frames or 0), _reason(exc)) from exc
        if buf:
            yield _to_model_range(buf, height, width)
        if n == 0:
            raise ValueError(f"video {path} contains no decodable frames")
    finally:
        container.close()


def _log_conversion(path, frame, height, width) -> None:
    """One line per file saying what reading does to its frames: resize (and aspect-ratio change), alpha
    dropped, grayscale made RGB. Nothing when frames are used as they are."""
    fmt = frame.format
    channels = len(fmt.components)
    done = []
    if height is not None and width is not None and (frame.height, frame.width) != (height, width):
        aspect = (width / height) / (frame.width / frame.height)
        done.append(f"resized {frame.width}x{frame.height} -> {width}x{height} (width x height)"
                    + (f", aspect ratio changed by x{aspect:.2f}" if abs(aspect - 1) > 0.01 else ""))
    if channels in (2, 4) and not fmt.has_palette:
        done.append(f"alpha channel dropped ({fmt.name})")
    if channels in (1, 2) and not fmt.has_palette:
        done.append(f"grayscale ({fmt.name}) converted to RGB")
    if done:
        log.warning("%s: %s", path, "; ".join(done))


def _to_model_range(frames: list, height, width) -> torch.Tensor:
    x = torch.stack(frames).permute(0, 3, 1, 2).float()  # [t, 3, h, w] 0..255
    if height is not None and width is not None:
        x = resize_frames(x, height, width)
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def load_video(path, *, height: Optional[int] = None, width: Optional[int] = None,
               max_frames: Optional[int] = None) -> torch.Tensor:
    """The whole video as [3, T, H, W] float32 in [-1, 1]."""
    parts = list(iter_video_frames(path, height=height, width=width, max_frames=max_frames, batch=32))
    return torch.cat(parts, dim=1)


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 (x * 255 + 0.5, truncated), on the tensor's own device: the one rounding
    every writer uses (``sdv2 run`` does it on the GPU before the copy to the host: 4x fewer bytes)."""
    return (frames.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def _to_uint8(frames) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] (numpy or tensor) or uint8 -> uint8 numpy."""
    if not isinstance(frames, torch.Tensor):
        frames = np.asarray(frames)
        if frames.dtype != np.uint8:
            frames = torch.from_numpy(np.ascontiguousarray(frames))
    if isinstance(frames, torch.Tensor):
        frames = (frames if frames.dtype == torch.uint8 else frames_to_uint8(frames)).cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    return frames


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a video was being written; says what was kept."""


class VideoWriter:
    """Incremental H.264 writer; the file appears at ``path`` only after ``close()`` succeeds.

        with VideoWriter("out.mp4", fps=16) as w:
            w.write(frames)      # [T, H, W, 3] in [0, 1], any number of calls

    In a ``with`` block, an error drops the partial file (and the folders made for it); Ctrl-C keeps the frames
    written so far as a complete, shorter video (as ffmpeg does) and says so (``Interrupted``).
    """

    def __init__(self, path, *, fps: float = 16, crf: int = 18):
        self.path = check_output_file(path, "output video")
        self.fps, self.crf = fps, crf
        parent = self.path.parent if str(self.path.parent) else Path(".")
        self._made = [p for p in (parent, *parent.parents) if not p.exists()]   # removed again on abort
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.mp4", dir=parent)
            os.close(fd)
        except OSError as exc:
            raise PermissionError(f"cannot write to output folder {parent}: {exc}") from exc
        self._tmp = Path(tmp)
        self._container = None
        self._stream = None
        self.frames_written = 0

    def write(self, frames) -> None:
        import av
        frames = _to_uint8(frames)
        if self._container is None:
            h, w = frames.shape[1:3]
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=int(round(self.fps)))
            self._stream.width, self._stream.height = w + (w % 2), h + (h % 2)  # yuv420p needs even sizes
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        for f in frames:
            if f.shape[0] % 2 or f.shape[1] % 2:
                f = np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)), mode="edge")
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        if self._container is None:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial file and the folders made for it (on any failure: nothing is left behind)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 -- the file is removed next; the original error matters
                pass
            self._container = None
        self._tmp.unlink(missing_ok=True)
        for folder in self._made:   # innermost first; a folder something else has filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt) and not issubclass(exc_type, Interrupted):
            if not self.frames_written:
                self.abort()
                raise Interrupted("no frame had been written: nothing kept") from None
            self.close()
            raise Interrupted(f"kept the {self.frames_written} frame(s) written so far in {self.path}") from None
        else:
            self.abort()


def export_video(frames, path, *, fps: float = 16) -> Path:
    """Write all frames [T, H, W, 3] (float in [0, 1] or uint8) as one mp4, atomically."""
    with VideoWriter(path, fps=fps) as w:
        w.write(frames)
    return Path(path)
