"""The seed-compatible Python API (the reference's ``streamdiffusionv2`` package, reference.md §4.1-4.4).

    import numpy as np
    from sdv2_lab import StreamDiffusionV2Pipeline, export_video, load_video

    pipe = StreamDiffusionV2Pipeline(checkpoint_folder="ckpts/wan_causal_dmd_v2v", mode="single")
    pipe.prepare("a watercolor painting")
    video = load_video("examples/original.mp4", height=480, width=832)
    frames, noise_scale = [], None
    for chunk in pipe.chunk_video(video):
        encoded = pipe.encode_chunk(video, chunk, previous_noise_scale=noise_scale)
        noise_scale = encoded.noise_scale
        denoised = pipe.denoise_chunk(encoded)
        if denoised is not None:
            frames.append(pipe.decode_chunk(denoised))
    frames += pipe.flush()                     # the chunks still in the stream batch (the reference drops them)
    export_video(np.concatenate(frames), "outputs/output.mp4", fps=16)

Everything runs in process on one ``StreamPipeline`` (no subprocesses, no second copy of the models):
``enable_acceleration`` switches the running pipeline in place. The seed's arguments become a Hydra config
through ``seed_config.seed_overrides`` (the same function ``run_v2v.sh`` uses); the config is checked
(``preflight.check_config``) before any model is built.

At the engine's speed, with the seed's loop unchanged: nothing per chunk touches the whole video (each chunk's own
frames cross to the GPU, from pinned memory, when it is encoded; a file is loaded once); ``encode_chunk`` and
``denoise_chunk`` only enqueue GPU work, on the engine's own CUDA streams (the noise scale stays a device value:
``EncodedChunk.noise_scale`` is a number that reads the GPU only when used as one, and passing it back as
``previous_noise_scale`` reads nothing); ``decode_chunk`` waits once, for its own frames, which come back through
a pinned buffer.
"""
from __future__ import annotations

import logging
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .units import chunk_frames, latent_frames, tokens_per_latent_frame

log = logging.getLogger(__name__)
DUMMY_HINT = "checkpoint_folder=... loads the official files: README, 'Real weights'"


def _say(line: str) -> None:
    """One visible line for the API's user: logged (INFO) where logging is set up, else printed to stderr (a
    notebook or a script has no handlers, and would otherwise see nothing for minutes)."""
    if log.hasHandlers():
        log.info(line)
    else:
        print(f"sdv2_lab: {line}", file=sys.stderr, flush=True)


class NoiseScale:
    """The noise level applied to a chunk: a device scalar that behaves as a number. Reading it as one
    (``float``, arithmetic, formatting, comparison) waits for the GPU; passing it back as
    ``previous_noise_scale`` uses the device value and waits for nothing."""

    __slots__ = ("tensor", "ready")

    def __init__(self, tensor: torch.Tensor, ready: Optional[torch.cuda.Event] = None):
        self.tensor, self.ready = tensor, ready     # ready: the end of the encode that made it (its CUDA stream)

    def __float__(self) -> float:
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
        return float(self.tensor)

    def __repr__(self) -> str:
        return repr(float(self))

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __eq__(self, other) -> bool:
        return float(self) == float(other)

    def __lt__(self, other) -> bool:
        return float(self) < float(other)

    def __le__(self, other) -> bool:
        return float(self) <= float(other)

    def __gt__(self, other) -> bool:
        return float(self) > float(other)

    def __ge__(self, other) -> bool:
        return float(self) >= float(other)

    def __hash__(self) -> int:
        return hash(float(self))

    def __round__(self, ndigits=None):
        return round(float(self), ndigits)

    def __add__(self, other):
        return float(self) + float(other)

    def __radd__(self, other):
        return float(other) + float(self)

    def __sub__(self, other):
        return float(self) - float(other)

    def __rsub__(self, other):
        return float(other) - float(self)

    def __mul__(self, other):
        return float(self) * float(other)

    def __rmul__(self, other):
        return float(other) * float(self)

    def __truediv__(self, other):
        return float(self) / float(other)

    def __rtruediv__(self, other):
        return float(other) / float(self)


def _scale_value(value):
    """What the engine takes as a noise scale: the device value of a NoiseScale, else the number (or None)."""
    return value.tensor if isinstance(value, NoiseScale) else value


@dataclass
class VideoChunk:
    frames: torch.Tensor          # [1, 3, T, H, W] in [-1, 1]: a view of the input video (it goes to the GPU when
                                  # encoded: only this chunk's frames cross, never the whole video again)
    start_idx: int
    end_idx: int
    current_start: int            # virtual token offsets, as the reference reports them
    current_end: int


@dataclass
class EncodedChunk:
    noisy_latents: torch.Tensor
    current_start: int
    current_end: int
    noise_scale: object           # a NoiseScale (a device number) or a float
    current_step: object = None
    first: bool = False


@dataclass
class DenoisedChunk:
    denoised_pred: torch.Tensor   # [1, F, 16, h, w] x0 latents (never aliases the stream state)
    last_frame_only: bool = True


def load_video(video_path: str | os.PathLike, *, height: int = 480, width: int = 832) -> torch.Tensor:
    """Decode a video file to [3, T, H, W] float32 in [-1, 1], resized with antialiasing (one log line says
    what was done to the frames). A still image is refused, named as such."""
    from .io.video import load_video as _load, probe_video
    probe_video(video_path).check_length(1, "video_path")
    return _load(video_path, height=height, width=width)


def export_video(video, output_path: str | os.PathLike, *, fps: int = 16) -> str:
    """Write [T, H, W, 3] frames in [0, 1] as an H.264 mp4 (atomically: no half-written file on failure)."""
    from .io.video import export_video as _export
    _export(video, output_path, fps=fps)
    return str(output_path)


class _InputVideo:
    """The input video as the staged calls see it: loaded once per file, its shape checked once per tensor, never
    copied whole: each chunk's frames cross to the device when that chunk is encoded (their values are checked
    there, without a wait: ``input_guard``). ``bytes_in`` counts the host bytes handed to the engine, so that
    per-chunk cost can be tested."""

    def __init__(self, owner: "StreamDiffusionV2Pipeline"):
        self.owner = owner
        self.key = None          # (weakref to the source tensor, its version) or (path, mtime, size)
        self.video: Optional[torch.Tensor] = None
        self.bytes_in = 0

    def get(self, video) -> torch.Tensor:
        """The video as [1, 3, T, H, W] on its own device."""
        o = self.owner
        if isinstance(video, (str, Path)):
            st = Path(video).stat()
            key = (str(Path(video).resolve()), st.st_mtime_ns, st.st_size)
            if key != self.key:
                self.video, self.key = load_video(video, height=o.height, width=o.width)[None], key
            return self.video
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a path or a tensor, got {type(video).__name__}")
        if self.key is not None and isinstance(self.key[0], weakref.ref) and self.key[0]() is video \
                and self.key[1] == video._version:
            return self.video
        source = video
        if video.dim() == 4:
            video = video[None]
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video tensor must be [3, T, H, W] or [1, 3, T, H, W], got {tuple(video.shape)}")
        if tuple(video.shape[-2:]) != (o.height, o.width):
            raise ValueError(f"video is {video.shape[-2]}x{video.shape[-1]}, the pipeline runs at "
                             f"{o.height}x{o.width}: load it with load_video(path, height=, width=)")
        self.video, self.key = video, (weakref.ref(source), source._version)
        return video

    def piece(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames of one chunk on their way to the engine: host frames pinned for an asynchronous copy, device
        frames as they are. (Their values are checked on the device, per chunk: ``input_guard``.)"""
        if frames.device.type != "cpu":
            return frames
        self.bytes_in += frames.numel() * frames.element_size()
        return frames.pin_memory() if self.owner.device.type == "cuda" else frames


class _HostFrames:
    """Device frames -> a numpy array: one asynchronous copy into pinned memory, one wait for these frames only.
    Each call gets its own pinned block from torch's caching host allocator (reused once the array that holds
    it is freed), so the array is handed out as it is, without a second host copy."""

    def __call__(self, frames: torch.Tensor) -> np.ndarray:
        if frames.device.type != "cuda":
            return frames.to(torch.float32).contiguous().numpy().copy()
        frames = frames.to(torch.float32).contiguous()
        host = torch.empty(frames.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.numpy()   # the array keeps ``host`` alive


class StreamDiffusionV2Pipeline:
    """Staged in-process API: ``prepare`` -> ``chunk_video`` -> ``encode_chunk`` -> ``denoise_chunk`` ->
    ``decode_chunk`` (+ ``flush``). Constructor arguments follow the reference (reference.md §4.2).

    ``checkpoint_folder``: the folder holding ``model.pt``; the Wan2.1 folder, VAE, T5, tokenizer and TAEHV are
    found from it as the reference finds them (``sdv2_lab.seed_config``), and every size comes from the files.
    ``None``: the tiny model with dummy weights (for trying the API on a CPU). Extra arguments: ``wan_folder``,
    ``taehv`` (name those files directly), ``vae`` (``wan``, ``taehv``, ``taehv_full``, ``lightvae``, ``lighttae``,
    ``lighttae_full``: ``seed_config.VAES``) and ``overrides`` (Hydra overrides of ``conf/``, applied last, e.g.
    ``["attention=flex", "num_kv_cache=8"]``). On a GPU the fast paths (CUDA graphs, overlapped stages, fused VAE)
    are on and a warm-up runs at build. ``close()`` (or ``with``) frees the models."""

    def __init__(self, checkpoint_folder: Optional[str] = None, *, mode: str = "single", config_path=None,
                 device=None, noise_scale: float = 0.8, height: int = 480, width: int = 832, fps: int = 16,
                 step: Optional[int] = None, seed: int = 0, model_type: str = "T2V-1.3B",
                 model: Optional[str] = None, use_taehv: bool = False,
                 use_tensorrt: bool = False, fast: bool = False, profile: bool = False,
                 wan_folder: Optional[str] = None, taehv: Optional[str] = None, vae: Optional[str] = None,
                 overrides: Optional[list[str]] = None):
        from . import build

        if mode not in ("single", "single-wo"):
            raise ValueError(f"StreamDiffusionV2Pipeline runs 'single' or 'single-wo', not {mode!r} "
                             f"(pipe mode: run_video_to_video(mode='pipe', ...) or ./run_v2v.sh pipe)")
        # the bound is the recipe's (a stream batch: 1 to 4; Rolling Forcing's window: its 5), checked with the config
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"step must be a positive integer (1 to 4 for StreamDiffusionV2), got {step!r} "
                             f"(None: the model's recipe)")
        self._seed_args = dict(checkpoint_folder=checkpoint_folder, mode=mode, config_path=config_path,
                               device=device, noise_scale=noise_scale, height=height, width=width, fps=fps, step=step,
                               seed=seed, model_type=model_type, model=model, wan_folder=wan_folder, taehv=taehv,
                               vae=vae)
        self._overrides = list(overrides or [])
        self.cfg = self._compose(use_taehv=use_taehv, use_tensorrt=use_tensorrt, fast=fast)
        torch.manual_seed(seed)
        self.pipeline = build.build_pipeline(self.cfg, announce=_say, dummy_hint=DUMMY_HINT)
        self.mode, self.device, self.fps = mode, self.pipeline.device, fps
        self.height, self.width = height, width
        self.noise_scale = noise_scale
        self.first_chunk_size, self.chunk_size = self.pipeline.cfg.first_chunk_frames, self.pipeline.cfg.chunk_frames
        self.num_steps = self.pipeline.num_steps
        self.profile = profile
        self._prompt: Optional[str] = None
        self._video = _InputVideo(self)
        self._host = _HostFrames()
        if use_tensorrt or fast:
            log.info("use_tensorrt: there is no TensorRT here; TAEHV decodes with CUDA-graph replay on a GPU instead")
        if profile:
            log.info("profile: the staged API does not time chunks; sdv2 run and run_video_to_video print the "
                     "timings (docs/metrics.md)")

    def _compose(self, **acceleration):
        """The config of the seed's arguments (``seed_config.seed_overrides``) plus ``overrides``, checked before
        anything is built."""
        from .build import compose_config
        from .preflight import check_config
        from .seed_config import seed_overrides
        cfg = compose_config("config", seed_overrides(**self._seed_args, **acceleration) + self._overrides)
        check_config(cfg)
        return cfg

    @property
    def host_to_device_bytes(self) -> int:
        """Bytes of host video the staged calls have handed to the engine (each chunk's own frames, and the frame
        before it: never the whole video)."""
        return self._video.bytes_in

    # ------------------------------------------------------------------ lifecycle
    def _live(self):
        if self.pipeline is None:
            raise RuntimeError("this StreamDiffusionV2Pipeline was closed: make a new one")
        return self.pipeline

    def close(self) -> None:
        """Free the models, caches and graphs (GPU memory goes back to the allocator). Closing twice is fine."""
        if self.pipeline is None:
            return
        self.pipeline.close()
        self.pipeline = None
        self._video = _InputVideo(self)
        self._host = _HostFrames()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "StreamDiffusionV2Pipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def prepare(self, prompt: str) -> None:
        """Start a new stream with this prompt (all caches, positions and the noise controller reset)."""
        self._live().start(prompt)
        self._prompt = prompt

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt without restarting the stream."""
        self._live().set_prompt(prompt)
        self._prompt = prompt

    def enable_acceleration(self, *, use_taehv: bool = False, use_tensorrt: bool = False, fast: bool = False):
        """The seed's switches, applied to the running pipeline (the DiT and the text encoder are kept; the VAE
        is rebuilt when it changes; the KV cache, scheduler, executor and driver are made anew, so what runs is
        what the switches say): ``use_taehv`` decodes with TAEHV; ``use_tensorrt`` (implied by ``fast``) adds the
        accelerated decode path (TAEHV's CUDA-graph replay; there is no TensorRT here); ``fast`` also takes the
        seed's fast config (KV cache 5, 2 sink frames, no adaptive sink refresh). A stream in progress restarts
        with its prompt. Says in one line what it switched."""
        from .build import rebuild_pipeline
        from .settings import describe_paths
        old = self.cfg
        cfg = self._compose(use_taehv=use_taehv, use_tensorrt=use_tensorrt, fast=fast)
        changed = [f"{what} {a} -> {b}" for what, a, b in (
            ("VAE", old.vae.name, cfg.vae.name), ("KV cache frames", old.num_kv_cache, cfg.num_kv_cache),
            ("sink frames", old.sink_frames, cfg.sink_frames),
            ("adaptive sink refresh threshold", old.adapt_sink_threshold, cfg.adapt_sink_threshold)) if a != b]
        self.pipeline = rebuild_pipeline(self._live(), old, cfg, announce=lambda line: None)  # said below
        self.cfg = cfg
        self.num_steps = self.pipeline.num_steps
        if self._prompt is not None:
            self.pipeline.start(self._prompt)
            changed.append("stream restarted")
        _say(f"enable_acceleration: {'; '.join(changed) or 'nothing to switch'}; now {describe_paths(cfg)}")
        return self

    # ------------------------------------------------------------------ stages
    def chunk_video(self, video) -> list[VideoChunk]:
        """The chunks of the offline loop: the recipe's first chunk (StreamDiffusionV2's: frames [0, 5)), then
        ``chunk_size`` frames each; trailing frames are dropped. Views of the video (a file is loaded once);
        nothing is copied here."""
        video = self._video.get(video)
        total, first = video.shape[2], self.first_chunk_size
        if total < first:
            raise ValueError(f"the video has {total} frame(s); the first chunk needs {first}: give a longer video")
        S = tokens_per_latent_frame(self.height, self.width)
        chunks, start, end = [], 0, first
        cs, ce = 0, S * latent_frames(first, first=True)
        while end <= total:
            chunks.append(VideoChunk(video[:, :, start:end], start, end, cs, ce))
            start, end = end, end + self.chunk_size
            cs, ce = ce, ce + S * latent_frames(self.chunk_size, first=False)
        return chunks

    def encode_chunk(self, input_video, chunk: VideoChunk, *, previous_noise_scale=None,
                     initial_noise_scale=None) -> EncodedChunk:
        """VAE-encode one chunk and noise it; chunks after the first go through the motion noise controller (with
        the frame before the chunk from ``input_video``). Enqueues GPU work only."""
        from .stream.driver import Previous
        pipe = self._live()
        if pipe.state is None:
            raise RuntimeError("call prepare(prompt) first")
        first = chunk.start_idx == 0
        previous = None
        if not first:
            video = self._video.get(input_video)
            previous = Previous(self._video.piece(video[:, :, chunk.start_idx - 1:chunk.start_idx]),
                                _scale_value(self.noise_scale if previous_noise_scale is None else previous_noise_scale),
                                _scale_value(initial_noise_scale))
        elif pipe.state.chunks_in:
            raise RuntimeError("the first chunk was already encoded in this stream: call prepare() again")
        with torch.no_grad():
            e = pipe.encode_stage(self._video.piece(chunk.frames), previous)
        return EncodedChunk(e.noisy, chunk.current_start, chunk.current_end, NoiseScale(e.scale, e.ready), e.step,
                            first=first)

    def denoise_chunk(self, chunk: EncodedChunk) -> Optional[DenoisedChunk]:
        """One DiT step. ``single``: None until the stream batch has filled (n-1 chunks of latency)."""
        with torch.no_grad():
            x0 = self._live().denoise_stage(chunk.noisy_latents, chunk.current_step, first=chunk.first)
        return None if x0 is None else DenoisedChunk(x0, last_frame_only=not chunk.first)

    def decode_chunk(self, chunk: DenoisedChunk) -> np.ndarray:
        """x0 latents -> frames [T, H, W, 3] float32 in [0, 1] (numpy): waits for these frames only."""
        with torch.no_grad():
            frames = self._host(self._live().decode_frames(chunk.denoised_pred))
        self.pipeline.driver.verify(self.pipeline.stream)   # bad input frames: an error naming chunk and frame
        return frames

    def flush(self) -> list[np.ndarray]:
        """The frames of the chunks still in the stream batch, as a list of [T, H, W, 3] arrays."""
        pipe = self._live()
        out = [self._host(x) for x in (pipe.decode_frames(x0) for x0 in pipe.flush_latents())]
        pipe.driver.verify(pipe.stream)
        return out

    # ------------------------------------------------------------------ whole videos (reference §4.2)
    def encode_video(self, video) -> list[EncodedChunk]:
        """Every chunk of a video encoded and noised, in order (the stream's VAE state advances)."""
        if self._prompt is None:
            raise RuntimeError("call prepare(prompt) before encode_video(...)")
        self.prepare(self._prompt)
        out, scale = [], self.noise_scale
        for chunk in self.chunk_video(video):
            e = self.encode_chunk(video, chunk, previous_noise_scale=scale, initial_noise_scale=self.noise_scale)
            scale = e.noise_scale
            out.append(e)
        return out

    def denoise_chunks(self, chunks: list[EncodedChunk]) -> list[DenoisedChunk]:
        """The DiT over encoded chunks from a fresh stream (``prepare`` again first, as the reference), then the
        chunks still in the stream batch (the reference drops those), so every encoded chunk comes out."""
        if not chunks:
            raise ValueError("chunks must not be empty")
        if self._prompt is None:
            raise RuntimeError("call prepare(prompt) before denoise_chunks(...)")
        self.prepare(self._prompt)
        out = [d for d in (self.denoise_chunk(c) for c in chunks) if d is not None]
        return out + [DenoisedChunk(x0) for x0 in self._live().flush_latents()]

    def decode_chunks(self, chunks: list[DenoisedChunk]) -> np.ndarray:
        """Denoised chunks -> one [T, H, W, 3] video in [0, 1]."""
        if not chunks:
            raise ValueError("chunks must not be empty")
        return np.concatenate([self.decode_chunk(c) for c in chunks], axis=0)

    def __call__(self, video, *, progress: bool = True) -> np.ndarray:
        """Whole video in, whole restyled video out ([T, H, W, 3] in [0, 1]), streamed through the engine (the
        stages overlapped) with a progress bar."""
        from .stream.clips import stream_clip
        if self._prompt is None:
            raise RuntimeError("call prepare(prompt) first")
        frames = self._video.get(video)[0]
        with _progress(progress, _expected_frames(frames.shape[1], self.chunk_size)) as bar:
            out, _ = stream_clip(self._live(), frames, self._prompt, progress=bar)
        self.prepare(self._prompt)   # the engine's stream ended: the staged calls start a new one
        return out.numpy()


def _expected_frames(frames: int, chunk: int) -> int:
    return 1 + chunk * ((frames - 1) // chunk) if frames > chunk else 0


def _progress(enabled: bool, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="restyled frames", unit="f", disable=not enabled, mininterval=1.0,
                dynamic_ncols=True, file=sys.stderr)


def run_video_to_video(*, checkpoint_folder=None, video_path, prompt, output_path, mode="single", config_path=None,
                       device=None, gpu_ids=None, num_gpus=None, noise_scale=0.8, height=480, width=832, fps=16,
                       step=None, seed=0, model_type="T2V-1.3B", model=None, use_taehv=False, use_tensorrt=False, fast=False,
                       profile=False, schedule_block=False, wan_folder=None, taehv=None, vae=None,
                       overrides=None) -> str:
    """Restyle a video file and write the result; returns ``output_path``. In process for single modes. The
    output path and the input video are checked before any model is built."""
    options = dict(config_path=config_path, device=device, noise_scale=noise_scale, height=height, width=width,
                   fps=fps, step=step, seed=seed, model_type=model_type, model=model, use_taehv=use_taehv,
                   use_tensorrt=use_tensorrt, fast=fast, wan_folder=wan_folder, taehv=taehv, vae=vae,
                   overrides=overrides)
    if mode == "pipe":  # the DiT's blocks over num_gpus GPUs: `sdv2 run`'s function on one process per stage
        return _pipe_video_to_video(checkpoint_folder=checkpoint_folder, video_path=video_path, prompt=prompt,
                                    output_path=output_path, gpu_ids=gpu_ids, num_gpus=num_gpus,
                                    schedule_block=schedule_block, **options)
    options["device"] = _single_gpu_device(mode, device, gpu_ids, num_gpus)
    _check_files(video_path, output_path)
    with StreamDiffusionV2Pipeline(checkpoint_folder, mode=mode, profile=profile, **options) as pipe:
        return _restyle_file(pipe, video_path, prompt, output_path)


def _pipe_video_to_video(*, video_path, prompt, output_path, gpu_ids=None, num_gpus=None, device=None,
                         schedule_block=False, overrides=None, **seed_args) -> str:
    """``mode="pipe"``: the file through ``sdv2 run``'s function on ``num_gpus`` stages (default 2, or
    ``len(gpu_ids)``); writes ``output_path``."""
    from .cli import run
    from .configs import compose_config
    from .seed_config import quote, seed_overrides
    if gpu_ids is not None and num_gpus is not None and num_gpus != len(gpu_ids):
        raise ValueError(f"pipe mode: num_gpus={num_gpus} but gpu_ids={list(gpu_ids)} ({len(gpu_ids)} ids)")
    n = len(gpu_ids) if gpu_ids else (num_gpus or 2)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ov = [o for o in seed_overrides(mode="single", device=device, **seed_args) if not o.startswith("mode=")]
    out = Path(output_path).expanduser().absolute()
    ov += ["mode=pipe", f"num_gpus={n}", f"mode.schedule_block={str(bool(schedule_block)).lower()}",
           "input=file", f"input.video={quote(Path(video_path).expanduser().absolute())}",
           f"input.prompt={quote(prompt)}", f"output.dir={quote(out.parent)}", f"output.name={quote(out.name)}",
           "output.timings=null"]
    if gpu_ids:
        ov.append(f"mode.gpu_ids=[{','.join(str(int(i)) for i in gpu_ids)}]")
    run(compose_config("config", ov + list(overrides or [])))
    return str(out)


def _single_gpu_device(mode: str, device, gpu_ids, num_gpus):
    if num_gpus not in (None, 1) or (gpu_ids is not None and len(gpu_ids) != 1):
        raise ValueError(f"mode {mode!r} runs on one GPU; got gpu_ids={gpu_ids}, num_gpus={num_gpus}")
    return f"cuda:{gpu_ids[0]}" if gpu_ids else device


def _check_files(video_path, output_path) -> None:
    from .io.files import check_output_file
    from .io.video import probe_video
    check_output_file(output_path, "output_path")
    probe_video(video_path).check_length(chunk_frames(1, first=True), "video_path")


def _restyle_file(pipe: StreamDiffusionV2Pipeline, video_path, prompt: str, output_path) -> str:
    pipe.prepare(prompt)
    frames = pipe(load_video(video_path, height=pipe.height, width=pipe.width))
    return export_video(frames, output_path, fps=pipe.fps)


class StreamVideoToVideo:
    """The reference's file-to-file runner (reference.md §4.3) with the options stored once:

        runner = StreamVideoToVideo("ckpts/wan_causal_dmd_v2v", mode="single", step=2)
        runner.run_video("in.mp4", "a watercolor painting", "out.mp4")
        video = runner.generate("in.mp4", "a watercolor painting")   # [3, T, H, W] float, 0..255

    Single modes keep one in-process pipeline between calls (built at the first); ``pipe`` launches its ranks
    per call. ``close()`` (or ``with``) frees the models."""

    def __init__(self, checkpoint_folder=None, mode: str = "single", **options):
        if mode not in ("single", "single-wo", "pipe"):
            raise ValueError(f"mode must be 'single', 'single-wo' or 'pipe', got {mode!r}")
        known = set(run_video_to_video.__kwdefaults__) - {"checkpoint_folder", "video_path", "prompt", "output_path",
                                                          "mode"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"StreamVideoToVideo got unknown option(s) {unknown}; valid: {sorted(known)}")
        self.checkpoint_folder, self.mode, self.options = checkpoint_folder, mode, options
        self._pipe: Optional[StreamDiffusionV2Pipeline] = None

    def run_video(self, video_path, prompt: str, output_path) -> str:
        """Restyle ``video_path`` with ``prompt`` into ``output_path``; returns the output path."""
        if self.mode == "pipe":
            return run_video_to_video(checkpoint_folder=self.checkpoint_folder, video_path=video_path, prompt=prompt,
                                      output_path=output_path, mode="pipe", **self.options)
        _check_files(video_path, output_path)
        return _restyle_file(self._pipeline(), video_path, prompt, output_path)

    def generate(self, video_path, prompt: str) -> torch.Tensor:
        """The restyled video as the reference returns it: written, then read back as float [3, T, H, W] in
        0..255 (the mp4's own rounding included)."""
        import tempfile

        from .io.video import load_video as read
        with tempfile.TemporaryDirectory(prefix="sdv2-generate-") as tmp:
            out = self.run_video(video_path, prompt, Path(tmp) / "output_000.mp4")
            return (read(out) + 1.0) * 127.5

    def _pipeline(self) -> StreamDiffusionV2Pipeline:
        if self._pipe is None:
            opts = dict(self.options)
            schedule_block = opts.pop("schedule_block", False)  # noqa: F841  (pipe mode only)
            gpu_ids, num_gpus = opts.pop("gpu_ids", None), opts.pop("num_gpus", None)
            opts["device"] = _single_gpu_device(self.mode, opts.get("device"), gpu_ids, num_gpus)
            self._pipe = StreamDiffusionV2Pipeline(self.checkpoint_folder, mode=self.mode, **opts)
        return self._pipe

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def __enter__(self) -> "StreamVideoToVideo":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
