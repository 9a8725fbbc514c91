"""One stream through the stream engine, as a simple object: frames in, restyled frames out.

    pipe = StreamPipeline(dit, vae, text_encoder, PipelineConfig(...))
    pipe.start("a watercolor painting")          # a new stream: every piece of state is fresh
    for frames in camera:                         # [3, T, H, W] in [-1, 1], any T
        out = pipe.push(frames)                   # [T', H, W, 3] in [0, 1] (T' may be 0 while buffering)
    out = pipe.flush()                            # the chunks still in the stream batch

It is the single-stream face of ``StreamDriver`` (``driver.py``), which does the work: the scheduler
(``scheduler.py``) plans chunks and DiT jobs, an executor (``executor.py``) runs the DiT, the VAE encodes and
decodes. Many streams at once, overlap of the stages on CUDA streams and the per-chunk events live there.

Deliberate differences from the reference (none changes a stream's outputs): the step list is never mutated
across streams; stream positions are rebased every ``position_refresh_frames`` latent frames in every mode, so
streams of any length run (the reference's offline ``single`` crashes after ~1023 latent frames); ``flush``
emits exactly the chunks still in flight (the staged reference API drops n-1 of them, its offline loop
decodes one extra noise chunk); no host syncs per chunk.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backbones.kv_cache import StreamKVCache
from . import rolling
from .config import PipelineConfig
from .driver import Encoded, Previous, StreamDriver, frames_of, wait
from .executor import DiTExecutor, build_executor
from .schedule import FlowMatchSchedule
from .scheduler import MODES, Stream

__all__ = ["PipelineConfig", "StreamPipeline", "MODES"]


def executor_name(cfg: PipelineConfig, device: torch.device) -> str:
    """The DiT executor a config runs on a device: CUDA graphs where asked for and possible, else eager."""
    return "cuda_graph" if cfg.cuda_graph and device.type == "cuda" else "eager"


class StreamPipeline:
    def __init__(self, dit, vae, text_encoder, cfg: PipelineConfig, *, device=None, dtype=torch.bfloat16,
                 schedule: Optional[FlowMatchSchedule] = None, generator: Optional[torch.Generator] = None,
                 executor: Optional[str | DiTExecutor] = None):
        """``executor``: a registered name, or a built executor holding its own cache (a ``pipe`` stage)."""
        cfg.rope_positions = dit.cfg.rope_max_positions
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else dit.held_parameter().device
        self.dtype = dtype
        if isinstance(executor, DiTExecutor):
            self.executor = executor
        else:
            rows = cfg.max_streams * (len(cfg.step_list) if MODES[cfg.mode].stream_batch else 1)
            if cfg.rolling_window:   # one row per stream: the anchor and the clean ring
                cache = rolling.new_cache(dit, cfg, cfg.max_streams, dtype, self.device)
            else:
                cache = dit.new_cache(rows, cfg.height, cfg.width, cfg.num_kv_cache, cfg.sink_frames,
                                      cfg.adapt_sink_threshold, dtype=dtype, device=self.device,
                                      kv_dtype=cfg.kv_cache_dtype, sink_ema=cfg.sink_ema,
                                      key_bias=cfg.kv_attention_bias, memory_frames=cfg.memory,
                                      memory_interval=cfg.memory_record_interval)
            self.executor = build_executor(executor or executor_name(cfg, self.device), dit, cache,
                                           schedule or FlowMatchSchedule(cfg.timestep_shift))
        self.driver = StreamDriver(self.executor, vae, text_encoder, cfg, dtype=dtype, generator=generator)
        self.stream: Optional[Stream] = None
        self._encoded: list[Encoded] = []
        self.warmup_s: Optional[float] = None     # seconds the build's warm-up took (None: none was run)

    # ------------------------------------------------------------------ the parts (the driver owns them)
    @property
    def dit(self):
        return None if self.executor is None else self.executor.dit

    @property
    def vae(self):
        return None if self.driver is None else self.driver.vae

    @property
    def text_encoder(self):
        return None if self.driver is None else self.driver.text_encoder

    @torch.no_grad()
    def warm_up(self) -> float:
        """Stream a short synthetic clip through every stream slot and discard it, so that kernel JIT, cuDNN
        autotuning and CUDA-graph capture (the DiT's graphs are kept per row set and shape, so later streams
        replay them) happen now and not in a user's first chunks. Its own noise generators: the global RNG is
        untouched. Returns the seconds it took (also kept as ``warmup_s``)."""
        import time

        from ..io.synthetic import synthetic_clip
        from .clips import stream_clips
        t0 = time.perf_counter()
        frames = self.cfg.first_chunk_frames + self.cfg.chunk_frames * (self.cfg.num_kv_cache + self.num_steps + 3)
        clip = synthetic_clip(frames, self.cfg.height, self.cfg.width, seed=12345)[0].to(self.device)
        n = self.cfg.max_streams
        executor = self.driver.executor
        executor.warming = True   # first chunks capture their graphs only now (CUDAGraphExecutor)
        try:
            # then first chunks alone once more: a first chunk of one pass is a key's first (eager) call in the
            # round before, so its graph is captured in this one, not in a user's first chunk
            for length in (frames, self.cfg.first_chunk_frames):
                if self.cfg.t2v:
                    for i in range(n):
                        s = self.driver.open("warm-up", seed=12345 + i)
                        try:
                            self.driver.generate(s, length)
                        finally:
                            self.driver.close(s)
                else:
                    stream_clips(self, [clip[:, :length]] * n, ["warm-up"] * n, seeds=[12345 + i for i in range(n)])
        finally:
            executor.warming = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    # ------------------------------------------------------------------ the stream
    @property
    def num_steps(self) -> int:
        return self.driver.num_steps

    @property
    def weights_are_dummy(self) -> bool:
        return self.driver.weights_are_dummy

    @property
    def state(self) -> Optional[Stream]:
        """The running stream (its controller, positions and counters), or None before ``start``."""
        return self.stream

    @property
    def cache(self) -> StreamKVCache:
        return self.executor.cache

    def close(self) -> None:
        """Give back the pipeline's device memory (models, KV cache, CUDA graphs and their pools, stream states)
        now, not when the collector finds its cycles; the pipeline is unusable afterwards."""
        import gc
        if self.driver is not None:
            self.driver.release()
        self.stream, self._encoded = None, []
        self.driver = self.executor = None
        gc.collect()   # the modules' own cycles (a VAE keeps bound methods of itself)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def start(self, prompt: str, seed: Optional[int] = None) -> Stream:
        """Begin a new stream (the previous one ends): fresh KV rows, positions, noise controller, VAE state."""
        if self.stream is not None:
            self.driver.close(self.stream)
        self.stream = None
        self._encoded.clear()
        self.stream = self.driver.open(prompt, seed=seed)
        return self.stream

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        """Change the prompt mid-stream: only the cross-attention K/V change; the stream goes on."""
        self.driver.set_prompt(self._require(), prompt)

    def _require(self) -> Stream:
        if self.stream is None:
            raise RuntimeError("no stream: call start(prompt) first")
        return self.stream

    def frames_needed(self) -> int:
        """Input frames that make the next chunk (the first: ``cfg.first_chunk_frames``, the reference's 5)."""
        return self.driver.frames_needed(self._require())

    @property
    def pending_frames(self) -> int:
        return 0 if self.stream is None else self.stream.buffered

    # ------------------------------------------------------------------ frames in, frames out
    def _frames(self, outs) -> torch.Tensor:
        return frames_of(outs, self.cfg.height, self.cfg.width, self.device)

    @torch.no_grad()
    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Feed input frames [3, T, H, W] in [-1, 1]; returns finished frames [T', H, W, 3] in [0, 1]."""
        return self._frames(self.driver.push(self._require(), frames))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End of input: finish the chunks still in flight (trailing frames that do not fill a chunk are dropped)."""
        return self._frames(self.driver.flush(self._require()))

    @torch.no_grad()
    def flush_latents(self) -> list[torch.Tensor]:
        """End of input, without the decode: the x0 latents of the chunks still in flight, oldest first."""
        return self.driver.flush_latents(self._require())

    @torch.no_grad()
    def generate(self, num_frames: int) -> torch.Tensor:
        """Text-to-video: produce about ``num_frames`` frames from noise (requires ``cfg.t2v``)."""
        return self._frames(self.driver.generate(self._require(), num_frames))

    # ------------------------------------------------------------------ the stages, one at a time (staged API)
    @torch.no_grad()
    def encode_stage(self, chunk: Optional[torch.Tensor], previous: Optional[Previous] = None) -> Encoded:
        """Chunk [1, 3, T, H, W] in [-1, 1] on any device (None in t2v) -> its ``Encoded`` (noisy latents
        [1, F, 16, h, w], the noise scale, the timestep for slot 0 and the event that ends the encode). Chunks after
        the first go through the noise controller, from ``previous`` when given. Work the caller enqueued on the
        current CUDA stream comes first; nothing waits on the host."""
        s = self._require()
        after = [self.driver._current_event()]
        c = self.driver.scheduler.noise_chunk(s) if chunk is None else \
            self.driver.scheduler.chunk(s, self.driver._check_frames(chunk[0])[None])
        e = self.driver.encode(c, previous, after)
        self._encoded = [e]
        return e

    @torch.no_grad()
    def denoise_stage(self, noisy: torch.Tensor, step=None, *, first: Optional[bool] = None):
        """Noisy latents of one chunk -> a finished x0 [1, F, 16, h, w], or None while the stream batch fills.
        The first chunk of a stream denoises all steps at once (the reference's prepare)."""
        s = self._require()
        e = next((e for e in self._encoded if e.noisy is noisy), None)
        if e is None:  # latents made elsewhere: this is the stream's next chunk, as the scheduler counts them
            c = self.driver.scheduler.noise_chunk(s)
            if noisy.shape[1] != c.latent_frames:
                raise ValueError(f"this stream's next chunk has {c.latent_frames} latent frame(s), the latents "
                                 f"{tuple(noisy.shape)} have {noisy.shape[1]}")
            e = Encoded(c, noisy.to(self.device, self.dtype), ready=self.driver._current_event())
        if first is not None and first != e.chunk.first:
            raise ValueError(f"first={first}, but this is the stream's {'first' if e.chunk.first else 'next'} chunk")
        if step is not None:
            e.step = torch.as_tensor(step, device=self.device)
        self._encoded = []
        (job,) = self.driver.dit_jobs([e.chunk])
        (x0,) = self.driver.denoise(job, [e])
        emitted = job.emit[0]
        self.driver.scheduler.finished(job)
        return x0 if emitted else None

    @torch.no_grad()
    def decode_frames(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents -> frames [T, H, W, 3] in [0, 1] (the VAE's streaming decode)."""
        out = self.driver.decode(self._require(), x0)
        wait([out])
        return out.frames
