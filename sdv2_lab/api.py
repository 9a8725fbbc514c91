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
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .units import FRAMES_PER_LATENT, tokens_per_latent_frame

log = logging.getLogger(__name__)



def _vae_label(cfg) -> str:
    """The VAE a config builds, as a log reads it: ``wan``, ``taehv`` or ``taehv (cuda_graph decode)``."""
    accel = cfg.vae.get("accelerate", "none")
    return cfg.vae.name + ("" if accel in (None, "none") else f" ({accel} decode)")


@dataclass
class VideoChunk:
    frames: torch.Tensor          # [1, 3, T, H, W] in [-1, 1] on the device
    start_idx: int
    end_idx: int
    current_start: int            # virtual token offsets, as the reference reports them
    current_end: int


@dataclass
class EncodedChunk:
    noisy_latents: torch.Tensor
    current_start: int
    current_end: int
    _noise_scale: object
    current_step: object = None
    first: bool = False

    @property
    def noise_scale(self) -> float:
        """The noise level applied to this chunk (reading it waits for the GPU)."""
        return float(self._noise_scale)


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


class StreamDiffusionV2Pipeline:
    """Staged in-process API: ``prepare`` -> ``chunk_video`` -> ``encode_chunk`` -> ``denoise_chunk`` ->
    ``decode_chunk`` (+ ``flush``). Constructor arguments follow the reference (reference.md §4.2).

    ``checkpoint_folder``: the folder holding ``model.pt``; the Wan2.1 folder, VAE, T5, tokenizer and TAEHV are
    found from it as the reference finds them (``sdv2_lab.seed_config``), and every size comes from the files.
    ``None``: the tiny model with dummy weights (for trying the API on a CPU). Extra arguments: ``wan_folder``,
    ``taehv`` (name those files directly) and ``overrides`` (Hydra overrides of ``conf/``, applied last, e.g.
    ``["attention=flex", "num_kv_cache=8"]``)."""

    def __init__(self, checkpoint_folder: Optional[str] = None, *, mode: str = "single", config_path=None,
                 device=None, noise_scale: float = 0.8, height: int = 480, width: int = 832, fps: int = 16,
                 step: int = 2, seed: int = 0, model_type: str = "T2V-1.3B", use_taehv: bool = False,
                 use_tensorrt: bool = False, fast: bool = False, profile: bool = False,
                 wan_folder: Optional[str] = None, taehv: Optional[str] = None,
                 overrides: Optional[list[str]] = None):
        from .build import build_pipeline

        if mode not in ("single", "single-wo"):
            raise ValueError(f"StreamDiffusionV2Pipeline runs 'single' or 'single-wo', not {mode!r} "
                             f"(pipe mode: run_video_to_video(mode='pipe', ...) or ./run_v2v.sh pipe)")
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 4:
            raise ValueError(f"step must be an integer from 1 to 4, got {step!r}")
        self._seed_args = dict(checkpoint_folder=checkpoint_folder, mode=mode, config_path=config_path,
                               device=device, noise_scale=noise_scale, height=height, width=width, fps=fps, step=step,
                               seed=seed, model_type=model_type, wan_folder=wan_folder, taehv=taehv)
        self._overrides = list(overrides or [])
        self.cfg = self._compose(use_taehv=use_taehv, use_tensorrt=use_tensorrt, fast=fast)
        torch.manual_seed(seed)
        self.pipeline = build_pipeline(self.cfg)
        self.mode, self.device, self.fps = mode, self.pipeline.device, fps
        self.height, self.width = height, width
        self.noise_scale = noise_scale
        self.chunk_size = FRAMES_PER_LATENT * int(self.cfg.frames_per_block)
        self.num_steps = self.pipeline.num_steps
        self.profile = profile
        self._prompt: Optional[str] = None
        if use_tensorrt or fast:
            log.info("use_tensorrt: there is no TensorRT here; TAEHV decodes with CUDA-graph replay on a GPU instead")
        if profile:
            log.info("profile: the staged API does not time chunks; sdv2 run and run_v2v.sh print the timings "
                     "(docs/metrics.md)")

    def _compose(self, **acceleration):
        """The config of the seed's arguments (``seed_config.seed_overrides``) plus ``overrides``, checked before
        anything is built."""
        from .build import compose_config
        from .preflight import check_config
        from .seed_config import seed_overrides
        cfg = compose_config("config", seed_overrides(**self._seed_args, **acceleration) + self._overrides)
        check_config(cfg)
        return cfg

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, prompt: str) -> None:
        """Start a new stream with this prompt (all caches, positions and the noise controller reset)."""
        self._prompt = prompt
        self.pipeline.start(prompt)

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt without restarting the stream."""
        self.pipeline.set_prompt(prompt)

    def enable_acceleration(self, *, use_taehv: bool = False, use_tensorrt: bool = False, fast: bool = False):
        """The seed's switches, applied to the running pipeline in place (the DiT and the text encoder are kept;
        only what changes is rebuilt): ``use_taehv`` decodes with TAEHV; ``use_tensorrt`` (implied by ``fast``)
        adds the accelerated decode path (TAEHV's CUDA-graph replay; there is no TensorRT here); ``fast`` also
        takes the seed's fast config (KV cache 5, 2 sink frames, no adaptive sink refresh) and replays DiT steps
        from a CUDA graph on a GPU. A stream in progress restarts with its prompt. Logs what it switched."""
        from .build import build_vae, pipeline_config
        old, pipe = self.cfg, self.pipeline
        cfg = self._compose(use_taehv=use_taehv, use_tensorrt=use_tensorrt, fast=fast)
        changed = [f"{what} {a} -> {b}" for what, a, b in (
            ("VAE", _vae_label(old), _vae_label(cfg)), ("KV cache frames", old.num_kv_cache, cfg.num_kv_cache),
            ("sink frames", old.sink_frames, cfg.sink_frames),
            ("adaptive sink refresh threshold", old.adapt_sink_threshold, cfg.adapt_sink_threshold),
            ("DiT CUDA graph", old.cuda_graph, cfg.cuda_graph)) if a != b]
        if _vae_label(old) != _vae_label(cfg):
            pipe.vae = build_vae(cfg, pipe.device, pipe.dtype)
        pipe.cfg = pipeline_config(cfg)
        self.cfg = cfg
        if self._prompt is not None:
            self.pipeline.start(self._prompt)
            changed.append("stream restarted")
        cpu = "" if pipe.device.type == "cuda" or not (use_tensorrt or fast) else \
            f" (the accelerated paths are CUDA graphs: eager on {pipe.device})"
        log.info("enable_acceleration: %s%s", "; ".join(changed) or "nothing to switch", cpu)
        return self

    # ------------------------------------------------------------------ stages
    def _video(self, video) -> torch.Tensor:
        if isinstance(video, (str, Path)):
            video = load_video(video, height=self.height, width=self.width)
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a path or a tensor, got {type(video).__name__}")
        if video.dim() == 4:
            video = video[None]
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video tensor must be [3, T, H, W] or [1, 3, T, H, W], got {tuple(video.shape)}")
        if tuple(video.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"video is {video.shape[-2]}x{video.shape[-1]}, the pipeline runs at "
                             f"{self.height}x{self.width}: load it with load_video(path, height=, width=)")
        if video.is_floating_point() and (video.min() < -1.001 or video.max() > 1.001):
            raise ValueError("video values must lie in [-1, 1] (load_video returns that range)")
        return video.to(self.device, self.pipeline.dtype)

    def chunk_video(self, video) -> list[VideoChunk]:
        """The chunks of the offline loop: frames [0, 5), then [1+4k, 5+4k); trailing frames are dropped."""
        video = self._video(video)
        total = video.shape[2]
        if total < 1 + self.chunk_size:
            raise ValueError(f"the video has {total} frame(s); the first chunk needs {1 + self.chunk_size} "
                             f"(1 + {self.chunk_size}): give a longer video")
        S = tokens_per_latent_frame(self.height, self.width)
        chunks, start, end = [], 0, 1 + self.chunk_size
        cs, ce = 0, S * (1 + self.chunk_size // FRAMES_PER_LATENT)
        while end <= total:
            chunks.append(VideoChunk(video[:, :, start:end], start, end, cs, ce))
            start, end = end, end + self.chunk_size
            cs, ce = ce, ce + S * (self.chunk_size // FRAMES_PER_LATENT)
        return chunks

    def encode_chunk(self, input_video, chunk: VideoChunk, *, previous_noise_scale=None,
                     initial_noise_scale=None) -> EncodedChunk:
        """VAE-encode one chunk and noise it; chunks after the first go through the motion noise controller."""
        if self.pipeline.state is None:
            raise RuntimeError("call prepare(prompt) first")
        pipe = self.pipeline
        with torch.no_grad():
            first = chunk.start_idx == 0
            scale = step = None
            if not first:
                video = self._video(input_video) if not isinstance(input_video, torch.Tensor) or \
                    input_video.device != self.device else (input_video if input_video.dim() == 5 else input_video[None])
                prev_last = video[:, :, chunk.start_idx - 1:chunk.start_idx]
                s_prev = self.noise_scale if previous_noise_scale is None else previous_noise_scale
                s0 = self.noise_scale if initial_noise_scale is None else initial_noise_scale
                scale, step = pipe.state.controller.next_scale(chunk.frames, prev_last, s_prev, s0)
            elif pipe.state.chunks_in:
                raise RuntimeError("the first chunk was already encoded in this stream: call prepare() again")
            noisy, scale, step = pipe.encode_stage(chunk.frames, scale=scale if not first else None, step=step)
        return EncodedChunk(noisy, chunk.current_start, chunk.current_end, scale, step, first=first)

    def denoise_chunk(self, chunk: EncodedChunk) -> Optional[DenoisedChunk]:
        """One DiT step. ``single``: None until the stream batch has filled (n-1 chunks of latency)."""
        with torch.no_grad():
            x0 = self.pipeline.denoise_stage(chunk.noisy_latents, chunk.current_step, first=chunk.first)
        return None if x0 is None else DenoisedChunk(x0.clone(), last_frame_only=not chunk.first)

    def decode_chunk(self, chunk: DenoisedChunk) -> np.ndarray:
        """x0 latents -> frames [T, H, W, 3] float32 in [0, 1] (numpy)."""
        with torch.no_grad():
            frames = self.pipeline.decode_frames(chunk.denoised_pred).cpu()
        self.pipeline.driver.verify(self.pipeline.stream)   # bad input frames: an error naming chunk and frame
        return frames.numpy()

    def flush(self) -> list[np.ndarray]:
        """The frames of the chunks still in the stream batch, as a list of [T, H, W, 3] arrays."""
        out = self.pipeline.flush().cpu()
        self.pipeline.driver.verify(self.pipeline.stream)
        return [out.numpy()] if out.shape[0] else []

    def __call__(self, video) -> np.ndarray:
        """Whole video in, whole restyled video out ([T, H, W, 3] in [0, 1])."""
        if self._prompt is None:
            raise RuntimeError("call prepare(prompt) first")
        self.prepare(self._prompt)
        video = self._video(video)
        out = torch.cat([self.pipeline.push(video[0]), self.pipeline.flush()]).cpu()
        self.pipeline.driver.verify(self.pipeline.stream)
        return out.numpy()


def run_video_to_video(*, checkpoint_folder=None, video_path, prompt, output_path, mode="single", config_path=None,
                       device=None, gpu_ids=None, num_gpus=None, noise_scale=0.8, height=480, width=832, fps=16,
                       step=2, seed=0, model_type="T2V-1.3B", use_taehv=False, use_tensorrt=False, fast=False,
                       profile=False, schedule_block=False, wan_folder=None, taehv=None, overrides=None) -> str:
    """Restyle a video file and write the result; returns ``output_path``. In process for single modes. The
    output path and the input video are checked before any model is built."""
    from .io.files import check_output_file
    from .io.video import probe_video

    if mode == "pipe":  # the DiT's blocks over num_gpus GPUs, one process each (sdv2_lab/parallel/launch.py)
        from .parallel.launch import video_to_video
        return video_to_video(checkpoint_folder=checkpoint_folder, video_path=video_path, prompt=prompt,
                              output_path=output_path, gpu_ids=gpu_ids, num_gpus=num_gpus, device=device,
                              schedule_block=schedule_block, overrides=overrides, config_path=config_path,
                              noise_scale=noise_scale, height=height, width=width, fps=fps, step=step, seed=seed,
                              model_type=model_type, use_taehv=use_taehv, use_tensorrt=use_tensorrt, fast=fast,
                              wan_folder=wan_folder, taehv=taehv)
    if num_gpus not in (None, 1) or (gpu_ids is not None and len(gpu_ids) != 1):
        raise ValueError(f"mode {mode!r} runs on one GPU; got gpu_ids={gpu_ids}, num_gpus={num_gpus}")
    if gpu_ids:
        device = f"cuda:{gpu_ids[0]}"
    check_output_file(output_path, "output_path")
    probe_video(video_path).check_length(1 + FRAMES_PER_LATENT, "video_path")
    pipe = StreamDiffusionV2Pipeline(checkpoint_folder, mode=mode, config_path=config_path, device=device,
                                     noise_scale=noise_scale, height=height, width=width, fps=fps, step=step,
                                     seed=seed, model_type=model_type, use_taehv=use_taehv,
                                     use_tensorrt=use_tensorrt, fast=fast, profile=profile, wan_folder=wan_folder,
                                     taehv=taehv, overrides=overrides)
    pipe.prepare(prompt)
    frames = pipe(load_video(video_path, height=height, width=width))
    return export_video(frames, output_path, fps=fps)
