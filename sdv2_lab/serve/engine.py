"""The model side of the server: one pipeline (``build_pipeline``) and its chunk driver, used from ONE worker
thread only (the driver is not thread-safe). The asyncio side (``hub.py``) calls ``await engine.call(fn, ...)``;
every call runs on that thread, one after another, in the order they were made.

One ``tick`` feeds each client's newest chunk of frames and runs one ``driver.step`` for all ready streams: their
chunks share one DiT call (each stream's first chunk runs alone, as the driver does).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..build import build_pipeline, build_vae
from ..configs import CONF_DIR
from ..settings import most_steps
from ..stream.driver import wait
from ..stream.input_guard import InputError
from ..stream.scheduler import Stream
from ..stream.timing import percentile
from .protocol import StreamOptions
from .settings import ServeSettings

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """No stream (or not enough KV-cache rows) is free."""


class ReopenFailed(RuntimeError):
    """A stream could not restart with new settings (``cause``); it runs on with the previous ones (``restored``)."""

    def __init__(self, cause: Exception, restored: Stream):
        super().__init__(str(cause))
        self.cause, self.restored = cause, restored


@dataclass
class TickResult:
    outputs: list = field(default_factory=list)     # (stream id, frames uint8 [T, H, W, 3])
    needed: dict = field(default_factory=dict)      # stream id -> input frames its next chunk needs
    failed: dict = field(default_factory=dict)      # stream id -> InputError (bad numbers: the stream stopped)
    step_ms: float = 0.0
    streams_stepped: int = 0


def max_steps_of(cfg: DictConfig, settings: ServeSettings) -> int:
    """The largest ``steps`` a client may ask for: ``serve.max_steps``, or (null) the recipe's own steps and at
    least 4 where its step list has them, within what the recipe runs (``settings.most_steps``: a stream batch
    holds one slot per step, at most 4; the rolling window one block per step, its whole list)."""
    bound, steps = most_steps(cfg), int(cfg.steps)
    wanted = settings.max_steps if settings.max_steps is not None else max(steps, min(4, bound))
    if not 1 <= wanted <= bound:
        raise ValueError(f"serve.max_steps={wanted} but this backbone's recipe allows 1..{bound} steps "
                         f"(denoising_step_list has {len(cfg.denoising_step_list)} entries"
                         f"{'' if cfg.get('rolling_window') else '; a stream batch takes at most 4'})")
    if not 1 <= steps <= wanted:
        raise ValueError(f"steps={steps} (a new stream's default) must be within 1..serve.max_steps={wanted}")
    return wanted


def engine_config(cfg: DictConfig, settings: ServeSettings) -> DictConfig:
    """The pipeline's config: ``max_streams`` streams, and enough denoising steps for any client's ``steps``
    (a stream opened with k steps uses the first k; ``steps`` stays the default of a new stream)."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    c.steps = max_steps_of(cfg, settings)
    c.streams = settings.max_streams
    c.t2v = False
    return c


class Engine:
    def __init__(self, cfg: DictConfig, settings: ServeSettings):
        self.cfg, self.settings = cfg, settings
        self.default_steps, self.default_noise = int(cfg.steps), float(cfg.noise_scale)
        run = engine_config(cfg, settings)
        self.max_steps = int(run.steps)   # the pipeline holds this many steps: a client's stream takes the first k
        self.pipe = build_pipeline(run)
        self.driver = self.pipe.driver
        self.height, self.width = self.pipe.cfg.height, self.pipe.cfg.width
        self.first_chunk, self.chunk = self.pipe.cfg.first_chunk_frames, self.pipe.cfg.chunk_frames
        self._taehv = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdv2-engine")
        self.step_ms: deque = deque(maxlen=256)
        self.batch_sizes: deque = deque(maxlen=256)
        self.ticks = 0

    # ------------------------------------------------------------------ the one worker thread
    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the engine's worker thread (in call order) and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ what the page and /api/health show
    @property
    def weights_are_dummy(self) -> bool:
        return self.driver.weights_are_dummy

    def describe(self) -> dict:
        c = self.cfg
        return {"model": c.backbone.name, "vae": c.vae.name, "mode": c.mode.name,
                "device": str(self.pipe.device), "dtype": str(self.pipe.dtype).replace("torch.", ""),
                "height": self.height, "width": self.width, "first_chunk_frames": self.first_chunk,
                "chunk_frames": self.chunk,
                "weights": "dummy" if self.weights_are_dummy else "real", "weights_dummy": self.weights_are_dummy,
                "default_steps": self.default_steps, "max_steps": self.max_steps,
                "default_noise_scale": self.default_noise, "taehv_vae": self.settings.taehv_vae,
                "taehv_default": c.vae.name == "taehv"}

    @property
    def streams_held(self) -> int:
        """Streams open in the engine (their KV rows are taken)."""
        return len(self.driver.scheduler.streams)

    def stats(self) -> dict:
        ms = list(self.step_ms)
        return {"ticks": self.ticks, "streams_open": len(self.driver.scheduler.streams),
                "step_ms_p50": round(percentile(ms, 50), 1) if ms else None,
                "step_ms_p95": round(percentile(ms, 95), 1) if ms else None,
                "streams_per_step_mean": round(float(np.mean(self.batch_sizes)), 2) if self.batch_sizes else None}

    # ------------------------------------------------------------------ streams (worker thread only)
    def open(self, opts: StreamOptions) -> Stream:
        busy = self.driver.capacity(opts.steps)
        if busy is not None:
            raise Busy(f"{busy} for steps={opts.steps}; try again when one ends")
        return self.driver.open(opts.prompt, seed=opts.seed, steps=opts.steps, noise_scale=opts.noise_scale,
                                vae=self.vae_for(opts.taehv))

    def close(self, s: Optional[Stream]) -> None:
        if s is not None and not s.closed:
            self.driver.close(s)

    def reopen(self, s: Stream, opts: StreamOptions, previous: StreamOptions) -> Stream:
        """The stream restarted with ``opts`` (steps, VAE). If that cannot open: ``ReopenFailed`` with the stream
        restarted with ``previous``; if not even that opens, that error (the stream has ended)."""
        self.close(s)
        try:
            return self.open(opts)
        except Exception as exc:
            raise ReopenFailed(exc, self.open(previous)) from exc

    def set_prompt(self, s: Stream, prompt: str) -> None:
        self.driver.set_prompt(s, prompt)

    def set_noise_scale(self, s: Stream, value: float) -> None:
        """Mid-stream: the noise controller's target s0 from the next chunk on."""
        self.driver.set_noise_scale(s, value)

    def frames_needed(self, s: Stream) -> int:
        return self.driver.frames_needed(s)

    def vae_for(self, taehv: bool):
        """The config's VAE, or (``taehv``) the TAEHV decoder of ``serve.taehv_vae``, built once on first use."""
        if not taehv or self.cfg.vae.name == "taehv":
            return self.driver.vae
        if self._taehv is None:
            path = CONF_DIR / "vae" / f"{self.settings.taehv_vae}.yaml"
            if not path.is_file():
                raise ValueError(f"serve.taehv_vae={self.settings.taehv_vae!r}: no {path}")
            c = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=False))
            c.vae = OmegaConf.load(path)
            log.info("building the TAEHV VAE (%s) for clients that turn it on", self.settings.taehv_vae)
            self._taehv = build_vae(c, self.pipe.device, self.pipe.dtype)
        return self._taehv

    # ------------------------------------------------------------------ frames in, frames out
    @torch.no_grad()
    def tick(self, work: list[tuple[Stream, np.ndarray]]) -> TickResult:
        """Feed each stream its frames (uint8 [T, H, W, 3]) and run one step of every ready stream."""
        result = TickResult()
        streams = []
        for s, frames in work:
            if s.closed:            # closed or restarted after this work was planned: its frames are gone
                continue
            x = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)   # [3, T, H, W]
            self.driver.feed(s, x)
            streams.append(s)
        ready = [s for s in streams if self.driver.scheduler.ready(s)]
        if ready:
            t0 = time.perf_counter()
            outs = self.driver.step(ready)
            if outs:
                wait(outs)   # the frames are ready on this stream (decode may run on a lane of its own)
                frames = torch.cat([o.frames for o in outs]).mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
                for o, piece in zip(outs, frames.split([o.frames.shape[0] for o in outs])):
                    try:
                        self.driver.verify(o)     # read on the host now: bad numbers end that stream only
                    except InputError as exc:
                        result.failed[o.stream] = exc
                        continue
                    if o.stream not in result.failed:
                        result.outputs.append((o.stream, piece.numpy()))
            result.step_ms = 1e3 * (time.perf_counter() - t0)
            result.streams_stepped = len(ready)
            self.step_ms.append(result.step_ms)
            self.batch_sizes.append(len(ready))
            self.ticks += 1
        result.needed = {s.id: self.driver.frames_needed(s) for s in streams if not s.closed}
        return result

    def warmup(self) -> None:
        """One short synthetic stream through every stage (first chunk, the stream batch filling, a flush)."""
        t0 = time.perf_counter()
        opts = StreamOptions(self.settings.default_prompt, self.default_steps, self.default_noise)
        s = self.open(opts)
        try:
            n = self.first_chunk + self.chunk * (self.default_steps + 1)
            t = torch.linspace(0, 1, n)[None, :, None, None]
            frames = (torch.rand(3, 1, self.height, self.width) * 2 - 1) * (1 - t) + t * 0.5
            self.driver.push(s, frames)
            self.driver.flush(s)
        finally:
            self.close(s)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
        log.info("warm-up: %.1f s", time.perf_counter() - t0)
