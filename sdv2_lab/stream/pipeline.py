"""The streaming video-to-video (and text-to-video) pipeline: frames in, restyled frames out.

    pipe = StreamPipeline(dit, vae, text_encoder, PipelineConfig(...))
    pipe.start("a watercolor painting")          # a new stream: every piece of state is fresh
    for frames in camera:                         # [3, T, H, W] in [-1, 1], any T
        out = pipe.push(frames)                   # [T', H, W, 3] in [0, 1] (T' may be 0 while buffering)
    out = pipe.flush()                            # the chunks still in the stream batch

Stages per chunk (reference.md §2): chunker -> VAE encode -> noise controller -> DiT step -> VAE decode.
Modes are denoising strategies over one state (``StreamBatch`` for ``single``, ``Sequential`` for
``single-wo``), not copied loops. Everything persisting between chunks lives in ``StreamState``.

Deliberate differences from the reference (none changes a stream's outputs): the step list is never mutated
across streams; stream positions are rebased every ``position_refresh_frames`` latent frames in every mode, so
streams of any length run (the reference's offline ``single`` crashes after ~1023 latent frames); ``flush``
emits exactly the chunks still in flight (the staged reference API drops n-1 of them, its offline loop
decodes one extra noise chunk); no host syncs per chunk unless ``target_fps`` asks for timing.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from .noise_controller import MotionNoiseController, NoiseControllerConfig, mix_noise
from .schedule import FlowMatchSchedule

log = logging.getLogger(__name__)

CHUNK_FRAMES = 4  # video frames per latent frame (Wan VAE temporal stride)


@dataclass
class PipelineConfig:
    height: int = 480
    width: int = 832
    mode: str = "single"                      # "single" (stream batch) or "single-wo" (all steps per chunk)
    denoising_steps: list = field(default_factory=lambda: [700, 500])  # one entry per step, no trailing 0
    num_kv_cache: int = 6                     # latent frames held in the KV cache
    sink_frames: int = 3                      # num_sink_tokens (counts latent frames)
    adapt_sink_threshold: float = 0.2         # -1 disables adaptive sink refresh
    frames_per_block: int = 1                 # latent frames per chunk (num_frame_per_block)
    noise: NoiseControllerConfig = field(default_factory=NoiseControllerConfig)
    t2v: bool = False                         # text-to-video: pure noise in, no input video
    position_refresh_frames: int = 50         # rebase positions at this latent frame (t_refresh; 0 = never)
    target_fps: Optional[float] = None        # grow chunks to (N - sink - 1) latents if slower than this
    reference_rng_order: bool = False         # draw re-noise per stream-batch row, in the reference's order
    cuda_graph: bool = False                  # replay steady-state DiT calls from a CUDA graph

    def validate(self) -> None:
        if self.mode == "pipe":  # its config exists so that sweeps and presets can name it; the strategy does not
            raise NotImplementedError("parallel=pipe (DiT blocks split across GPUs) is not implemented in this "
                                      "version; use parallel=single or parallel=single_wo")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {sorted(MODES)}")
        if not 1 <= len(self.denoising_steps) <= 4:
            raise ValueError(f"1 to 4 denoising steps are supported, got {list(self.denoising_steps)}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}; nearest "
                             f"valid: {max(16, round(self.height / 16) * 16)}x{max(16, round(self.width / 16) * 16)}")

    @property
    def step_list(self) -> list[int]:
        return list(self.denoising_steps) + ([0] if self.t2v else [])  # t2v keeps the final t = 0 pass


@dataclass
class StreamState:
    """Everything one stream carries between chunks. Two streams never share one; weights are shared."""
    prompt: str
    vae_state: object
    cache: object
    controller: MotionNoiseController
    t: torch.Tensor                          # [n] timesteps per stream-batch slot (slot 0 newest)
    hidden: Optional[torch.Tensor] = None    # [n, F, C, h, w] latents in flight (stream batch)
    starts: list = field(default_factory=list)   # virtual start token per slot (host ints)
    next_start: int = 0                      # virtual start token of the next chunk
    pending: Optional[torch.Tensor] = None   # input frames not yet forming a chunk [3, T, H, W]
    last_frame: Optional[torch.Tensor] = None  # last input frame (motion reference) [1, 3, 1, H, W]
    chunks_in: int = 0                       # chunks taken from the input (first chunk included)
    processed: int = 0                       # DiT stream steps after the first chunk
    real_in_flight: int = 0                  # chunks in the stream batch that came from the input
    frames_per_block: int = 1
    graph_step: object = None
    chunk_times: list = field(default_factory=list)
    last_noise_scale: Optional[torch.Tensor] = None


class StreamPipeline:
    def __init__(self, dit, vae, text_encoder, cfg: PipelineConfig, *, device=None, dtype=torch.bfloat16,
                 schedule: Optional[FlowMatchSchedule] = None, generator: Optional[torch.Generator] = None):
        cfg.validate()
        self.dit, self.vae, self.text_encoder, self.cfg = dit, vae, text_encoder, cfg
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.dtype = dtype
        self.schedule = schedule or FlowMatchSchedule()
        self.generator = generator
        self.strategy = MODES[cfg.mode](self)
        self.state: Optional[StreamState] = None
        self.stage: Callable[[str], ContextManager] = lambda name: contextlib.nullcontext()  # timing hook

    # ------------------------------------------------------------------ helpers
    @property
    def num_steps(self) -> int:
        return len(self.cfg.step_list)

    @property
    def weights_are_dummy(self) -> bool:
        return any(getattr(m, "weights_are_dummy", False) for m in (self.dit, self.vae, self.text_encoder))

    def _randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def _latent_shape(self, frames: int):
        return (frames, 16, self.cfg.height // 8, self.cfg.width // 8)

    def _prompt_embedding(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: give a text describing the target style")
        with self.stage("text"):
            emb = self.text_encoder.encode(prompt) if hasattr(self.text_encoder, "encode") else self.text_encoder(prompt)
        return emb.to(self.device, self.dtype)

    # ------------------------------------------------------------------ stream lifecycle
    @torch.no_grad()
    def start(self, prompt: str) -> StreamState:
        """Begin a new stream: fresh VAE caches, KV cache, noise controller, positions; the prompt encoded."""
        cfg, n = self.cfg, self.num_steps
        self.state = None  # free the previous stream's KV cache and graph first: two at once do not fit at 14B
        cache = self.dit.new_cache(1, cfg.height, cfg.width, cfg.num_kv_cache, cfg.sink_frames,
                                   cfg.adapt_sink_threshold, total_steps=n, dtype=self.dtype, device=self.device,
                                   max_batch_size=n if self.strategy.batched else None)
        self.dit.set_prompt(cache, self._prompt_embedding(prompt))
        self.state = StreamState(prompt=prompt, vae_state=self.vae.new_state(1) if self.vae is not None else None,
                                 cache=cache, controller=MotionNoiseController(cfg.noise, self.device),
                                 t=torch.tensor(cfg.step_list, dtype=torch.long, device=self.device),
                                 frames_per_block=cfg.frames_per_block)
        return self.state

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        """Change the prompt mid-stream: only the cross-attention K/V change; the stream goes on."""
        st = self._require_state()
        self.dit.set_prompt(st.cache, self._prompt_embedding(prompt))
        st.prompt = prompt

    def _require_state(self) -> StreamState:
        if self.state is None:
            raise RuntimeError("no stream: call start(prompt) first")
        return self.state

    def frames_needed(self) -> int:
        """Input frames that make the next chunk (first chunk: 1 + 4*frames_per_block, as the reference: 5)."""
        st = self._require_state()
        per_chunk = CHUNK_FRAMES * st.frames_per_block
        return 1 + per_chunk if st.chunks_in == 0 else per_chunk

    # ------------------------------------------------------------------ frames in, frames out
    @torch.no_grad()
    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Feed input frames [3, T, H, W] in [-1, 1]; returns finished frames [T', H, W, 3] in [0, 1]."""
        st = self._require_state()
        frames = self._check_frames(frames)
        st.pending = frames if st.pending is None else torch.cat([st.pending, frames], dim=1)
        outputs = []
        while st.pending is not None and st.pending.shape[1] >= self.frames_needed():
            k = self.frames_needed()
            chunk, rest = st.pending[:, :k], st.pending[:, k:]
            st.pending = rest if rest.shape[1] else None
            out = self._process_chunk(chunk[None])
            if out is not None:
                outputs.append(out)
        return self._frames_out(outputs)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End of input: finish the chunks still in flight. Frames that do not fill a chunk are dropped (the
        VAE consumes whole chunks); ``pending_frames`` says how many."""
        st = self._require_state()
        if st.chunks_in == 0:
            raise ValueError(f"the input ended before the first chunk ({self.frames_needed()} frames) was complete")
        return self._frames_out(self.strategy.flush(st))

    @torch.no_grad()
    def generate(self, num_frames: int) -> torch.Tensor:
        """Text-to-video: produce about ``num_frames`` frames from noise (requires ``cfg.t2v``)."""
        if not self.cfg.t2v:
            raise ValueError("generate() needs PipelineConfig(t2v=True)")
        st = self._require_state()
        outputs = []
        num_chunks = (num_frames - 1) // CHUNK_FRAMES + 1
        for _ in range(num_chunks):
            out = self._process_chunk(None)
            if out is not None:
                outputs.append(out)
        outputs += self.strategy.flush(st)
        return self._frames_out(outputs)

    @property
    def pending_frames(self) -> int:
        st = self.state
        return 0 if st is None or st.pending is None else st.pending.shape[1]

    def _check_frames(self, frames: torch.Tensor) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[0] != 3:
            raise ValueError(f"frames must be a tensor [3, T, H, W] in [-1, 1], got "
                             f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        if tuple(frames.shape[2:]) != (self.cfg.height, self.cfg.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[3]} but the pipeline runs at "
                             f"{self.cfg.height}x{self.cfg.width}; resize them (sdv2_lab.io.video.load_video does)")
        return frames.to(self.device, self.dtype)

    def _frames_out(self, decoded: list) -> torch.Tensor:
        if not decoded:
            return torch.empty(0, self.cfg.height, self.cfg.width, 3, device=self.device)
        video = torch.cat(decoded, dim=1)[0]  # [T, 3, H, W] in [-1, 1]
        return (video.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ one chunk
    def _encode(self, st: StreamState, chunk: torch.Tensor) -> torch.Tensor:
        with self.stage("encode"):
            return self.vae.encode(st.vae_state, chunk).to(self.dtype)

    def _decode(self, st: StreamState, x0: torch.Tensor) -> torch.Tensor:
        with self.stage("decode"):
            return self.vae.decode(st.vae_state, x0)

    def encode_stage(self, chunk: Optional[torch.Tensor], scale=None, step=None):
        """Chunk [1, 3, T, H, W] in [-1, 1] (None in t2v) -> (noisy latents [1, F, 16, h, w], noise scale,
        timestep for slot 0 or None). ``scale``/``step`` override the stream's noise controller (staged API)."""
        st = self._require_state()
        first = st.chunks_in == 0
        if self.cfg.t2v:
            f = 1 if first else st.frames_per_block
            noise = self._randn_like(torch.empty(1, *self._latent_shape(f), device=self.device, dtype=self.dtype))
            st.chunks_in += 1
            return noise, None, None
        if scale is None:
            if first:
                scale, step = st.controller.s0, None
            else:
                with self.stage("noise"):
                    scale, step = st.controller.update(chunk, st.last_frame)
        latents = self._encode(st, chunk)
        noisy = mix_noise(latents, self._randn_like(latents), torch.as_tensor(scale, dtype=torch.float64,
                                                                               device=self.device))
        st.last_frame = chunk[:, :, -1:]
        st.last_noise_scale = scale
        st.chunks_in += 1
        return noisy, scale, step

    def denoise_stage(self, noisy: torch.Tensor, step=None, *, first: Optional[bool] = None):
        """Noisy latents of one chunk -> a finished x0 [1, F, 16, h, w], or None while the stream batch fills.
        The first chunk of a stream denoises all steps at once (the reference's prepare)."""
        st = self._require_state()
        first = st.hidden is None and st.processed == 0 and st.next_start == 0 if first is None else first
        with self.stage("dit"):
            return self.strategy.first(st, noisy) if first else self.strategy.step(st, noisy, step, real=True)

    def decode_stage(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents -> frames [1, T, 3, H, W] in [-1, 1] (the VAE's streaming decode)."""
        return self._decode(self._require_state(), x0)

    def _process_chunk(self, chunk: Optional[torch.Tensor]):
        """chunk [1, 3, T, H, W] (None in t2v). Returns decoded frames [1, T, 3, H, W] or None (batch filling)."""
        st, cfg = self.state, self.cfg
        t0 = time.perf_counter() if cfg.target_fps else None
        first = st.chunks_in == 0
        noisy, _, step = self.encode_stage(chunk)
        x0 = self.denoise_stage(noisy, step, first=first)
        out = None if x0 is None else self.decode_stage(x0)
        if t0 is not None and out is not None:
            self._adapt_chunk_size(st, out.shape[1] / (time.perf_counter() - t0))
        return out

    def _adapt_chunk_size(self, st: StreamState, fps: float) -> None:
        """``target_fps`` (reference §2.11, but without needing --profile): once, after the stream batch has
        filled, grow chunks to (N - sink - 1) latent frames when the measured speed is below the target."""
        cfg = self.cfg
        st.chunk_times.append(fps)
        if len(st.chunk_times) == 4 and fps < cfg.target_fps and st.frames_per_block == cfg.frames_per_block:
            grow = cfg.num_kv_cache - cfg.sink_frames - 1
            if grow > st.frames_per_block:
                log.info("measured %.1f FPS < target %.1f: chunks grow to %d latent frames", fps, cfg.target_fps, grow)
                st.frames_per_block = grow
                if st.hidden is not None:
                    st.hidden = st.hidden.repeat(1, grow // st.hidden.shape[1], 1, 1, 1)

    # ------------------------------------------------------------------ positions
    def _take_position(self, st: StreamState, frames: int) -> int:
        """Virtual start token of the next chunk, rebased when the stream reaches position_refresh_frames."""
        S = st.cache.spec.frame_tokens
        start = st.next_start
        refresh = self.cfg.position_refresh_frames
        if refresh and start // S >= refresh:
            start = (self.cfg.num_kv_cache - 1) * S  # §2.10: lands on the eviction branch, keeps RoPE small
        st.next_start = start + frames * S
        return start

    def _x0(self, st: StreamState, x: torch.Tensor, t: torch.Tensor, starts) -> torch.Tensor:
        if st.graph_step is not None:
            v = st.graph_step(x, t, starts)
        else:
            v = self.dit(x, t, st.cache, starts)
        return self.schedule.velocity_to_x0(v, x, t)

    def _renoise(self, x0: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Re-noise rows of x0 [R, F, ...] to timesteps t_next [R] with fresh noise."""
        if self.cfg.reference_rng_order and x0.shape[0] > 1:
            noise = torch.cat([self._randn_like(x0[i:i + 1]) for i in range(x0.shape[0])])
        else:
            noise = self._randn_like(x0)
        return self.schedule.add_noise(x0, noise, t_next)


class Sequential:
    """``single-wo``: each chunk gets all n steps in turn at batch 1; its x0 is decoded at once."""
    batched = False

    def __init__(self, pipe: StreamPipeline):
        self.pipe = pipe

    def _denoise(self, st: StreamState, x: torch.Tensor, start: int) -> torch.Tensor:
        f = x.shape[1]
        t = st.t
        for k in range(len(t)):
            x0 = self.pipe._x0(st, x, t[k].expand(1, f), [start])
            if k < len(t) - 1:
                x = self.pipe._renoise(x0, t[k + 1:k + 2])
        return x0

    def first(self, st: StreamState, noisy: torch.Tensor) -> torch.Tensor:
        start = self.pipe._take_position(st, noisy.shape[1])
        return self._denoise(st, noisy, start)

    def step(self, st: StreamState, noisy: torch.Tensor, step, real: bool) -> torch.Tensor:
        if step is not None:
            st.t[0] = step  # the controller's timestep for this (and, as the reference, later) passes
        start = self.pipe._take_position(st, noisy.shape[1])
        return self._denoise(st, noisy, start)

    def flush(self, st: StreamState) -> list:
        return []  # nothing in flight


class StreamBatch:
    """``single``: one stream-batch slot per denoising step; each DiT call moves every chunk one step and
    finishes the oldest (reference §2.7). Row 0 is the newest chunk, row n-1 the one that leaves."""
    batched = True

    def __init__(self, pipe: StreamPipeline):
        self.pipe = pipe

    def first(self, st: StreamState, noisy: torch.Tensor) -> torch.Tensor:
        pipe, n = self.pipe, len(st.t)
        start = pipe._take_position(st, noisy.shape[1])
        x0 = Sequential(pipe)._denoise(st, noisy, start)  # the first chunk: all steps at batch 1 (§2.6)
        st.cache.expand_batch(n)
        fpb = st.frames_per_block
        st.hidden = torch.zeros(n, *pipe._latent_shape(fpb), device=pipe.device, dtype=pipe.dtype)
        st.starts = [st.next_start] * n  # empty slots sit at the next position until real chunks arrive
        if pipe.cfg.cuda_graph and pipe.device.type == "cuda":
            from ..backbones.cuda_graph import CUDAGraphStep
            st.graph_step = CUDAGraphStep(pipe.dit, st.cache)
        return x0

    def step(self, st: StreamState, noisy: torch.Tensor, step, real: bool):
        pipe, n = self.pipe, len(st.t)
        start = pipe._take_position(st, noisy.shape[1])
        st.hidden = torch.cat([noisy, st.hidden[:-1]]) if n > 1 else noisy.clone()
        st.starts = [start] + st.starts[:-1]
        if step is not None:
            st.t[0] = step
        f = st.hidden.shape[1]
        x0 = pipe._x0(st, st.hidden, st.t[:, None].expand(n, f), st.starts)
        out = x0[-1:]
        if n > 1:
            st.hidden = torch.cat([pipe._renoise(x0[:-1], st.t[1:]), out])
        else:
            st.hidden = x0
        st.processed += 1
        st.real_in_flight = min(n, st.real_in_flight + 1) if real else st.real_in_flight - 1
        if st.processed < n:
            return None  # the oldest slot still holds a warm-up placeholder
        if pipe.cfg.t2v and st.processed == n:
            return None  # as the reference's t2v loop: the first stream output is not shown
        return out

    def flush(self, st: StreamState) -> list:
        """Push noise through until every real chunk has left the batch: n-1 extra calls at most."""
        pipe = self.pipe
        outs = []
        # the last real chunk entered at call P and leaves at call P + n - 1
        for _ in range(len(st.t) - 1 if st.processed > 0 else 0):
            fpb = st.hidden.shape[1]
            noise = pipe._randn_like(torch.empty(1, *pipe._latent_shape(fpb), device=pipe.device, dtype=pipe.dtype))
            with pipe.stage("dit"):
                x0 = self.step(st, noise, None, real=False)
            if x0 is not None:
                outs.append(pipe._decode(st, x0))
        return outs


MODES = {"single": StreamBatch, "single-wo": Sequential}
