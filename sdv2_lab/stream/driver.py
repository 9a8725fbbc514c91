"""The one chunk driver: every front end (``sdv2 run``, the harness, the Python API, ``run_v2v.sh``, the web
server) streams through it.

    driver = StreamDriver(executor, vae, text_encoder, cfg)
    s = driver.open("a watercolor painting", seed=1)     # a stream: its own rows, prompt, positions, VAE state
    driver.feed(s, frames)                                # [3, T, H, W] in [-1, 1], any T
    outs = driver.step()                                  # one chunk of every ready stream, one DiT job for all
    outs += driver.flush(s); driver.close(s)

One chunk's path, top to bottom, is ``_run``: the scheduler (pure logic) forms chunks and jobs; one VAE call
encodes every stream's chunk (their rows stacked, each stream's causal state its own: ``vae/state.py``) and
the motion-aware controller noises each chunk; an executor runs one DiT job for all streams; one VAE call
decodes the chunks that finished. Listeners get ``ChunkIn`` / ``StageRun`` / ``ChunkOut`` events
(``timing.py``): the CLI, the harness and the server subscribe; nothing is monkey-patched.

``overlap=True`` (GPU): encode, DiT and decode run on three CUDA streams ordered by events, so the encode of
chunk k+1 and the decode of chunk k-1 overlap the DiT of chunk k. The host never waits in the steady state;
tensors crossing streams are handed over with ``record_stream`` so the allocator does not reuse them early;
random numbers are drawn in the same host order either way, so outputs are identical with overlap on or off.
"""
from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..cuda_streams import named_stream
from ..units import FRAMES_PER_LATENT, PIXELS_PER_LATENT, to_unit
from ..vae.registry import decode_streams, encode_streams, release
from . import rolling
from .config import PipelineConfig
from .executor import Executor
from .input_guard import InputGuard
from .kv_rebuild import CleanFrames, replay_blocks
from .noise_controller import MotionNoiseController, mix_noise
from .scheduler import Chunk, DiTJob, Scheduler, Stream
from .timing import ChunkIn, ChunkOut, Clock, StageRun

log = logging.getLogger(__name__)

STAGES = ("encode", "dit", "decode")
LANE_OF = {"noise": "encode", "text": "dit"}   # stages that share another stage's CUDA stream


@dataclass
class DeviceState:
    """What the driver carries for one stream from chunk to chunk, on the device (``Stream.dev``; the scheduler
    keeps the stream's schedule and never reads this)."""
    t: torch.Tensor                          # [n] the slot timesteps (slot 0 written on the device by the controller)
    t_first: torch.Tensor                    # the first chunk's timesteps (all steps at once)
    controller: MotionNoiseController        # the motion-aware noise controller (its scale lives on the device)
    checks: Any                              # the input guard's records (input_guard.Checks)
    generator: Optional[torch.Generator]     # this stream's noise; None = the global generator
    vae: Any                                 # this stream's VAE (streams may use different ones)
    vae_state: Any
    hidden: Optional[torch.Tensor] = None    # [n, F, C, h, w] chunks in flight (stream batch), row 0 refilled per call
    last_frame: Optional[torch.Tensor] = None    # the last input frame [1, 3, 1, H, W] (the motion reference)
    scales: deque = field(default_factory=deque)  # noise scale of each real chunk in flight, oldest first
    clean: Optional[CleanFrames] = None      # finished latents kept for a KV rebuild (kv_recache / kv_recompute_frames)


@dataclass
class Encoded:
    chunk: Chunk
    noisy: torch.Tensor                      # [1, F, C, h, w]
    scale: Optional[torch.Tensor] = None     # the noise level applied (float64 device scalar)
    step: Optional[torch.Tensor] = None      # the timestep slot 0 gets (int64 device scalar), None = unchanged
    ready: Optional[torch.cuda.Event] = None # recorded after the encode: the DiT's lane waits for it


@dataclass
class Previous:
    """The staged API's explicit noise-controller inputs for a chunk: the frame before it [1, 3, 1, H, W] and the
    previous and initial noise scales (device scalars, floats, or None for the stream's own)."""
    last_frame: torch.Tensor
    scale: object = None
    initial: object = None


class Lanes:
    """Where each stage runs: its own CUDA stream when overlapping, else the current stream."""

    def __init__(self, device: torch.device, overlap: bool):
        # the process's lanes, shared with earlier pipelines: a stream per pipeline leaks its cuBLAS workspace
        self.streams = {name: named_stream(device, f"lane:{name}") for name in STAGES} \
            if overlap and device.type == "cuda" else None
        self.active: Optional[str] = None   # the lane of the innermost ``on`` block (what tests check)

    def stream(self, name: str) -> Optional[torch.cuda.Stream]:
        return None if self.streams is None else self.streams[LANE_OF.get(name, name)]

    @contextlib.contextmanager
    def on(self, name: str, after: Iterable[Optional[torch.cuda.Event]] = ()):
        """Run the block on stage ``name``'s stream, after the given events."""
        s, outer = self.stream(name), self.active
        self.active = LANE_OF.get(name, name)
        try:
            if s is None:
                yield
                return
            for ev in after:
                if ev is not None:
                    s.wait_event(ev)
            with torch.cuda.stream(s):
                yield
        finally:
            self.active = outer

    def handoff(self, t: Optional[torch.Tensor], to: str) -> None:
        """``t`` is used on stage ``to``'s stream too: keep its memory until that stream is done with it."""
        if self.streams is not None and t is not None and t.is_cuda:
            t.record_stream(self.stream(to) if to in STAGES else torch.cuda.current_stream())


class StreamDriver:
    def __init__(self, executor: Executor, vae, text_encoder, cfg: PipelineConfig, *,
                 dtype: torch.dtype = torch.bfloat16,
                 generator: Optional[torch.Generator] = None):
        cfg.validate()
        if cfg.kv_rebuild_note:
            log.info(cfg.kv_rebuild_note)
        if cfg.memory_note:
            log.info(cfg.memory_note)
        self.executor, self.vae, self.text_encoder, self.cfg = executor, vae, text_encoder, cfg
        self.device, self.dtype = executor.device, dtype
        # A ``pipe`` stage runs only its own part of a chunk's path (sdv2_lab/parallel): the first stage encodes,
        # the last decodes. Latents a stage does not own are meta tensors there (shapes only: no memory, no work).
        self.encodes = getattr(executor, "encodes", True)
        self.decodes = getattr(executor, "decodes", True)
        self.latent_device = self.device if self.encodes else torch.device("meta")
        self.schedule = executor.schedule
        self.generator = generator              # the default noise source of streams opened without a seed
        scheduler = rolling.RollingScheduler if cfg.rolling_window else Scheduler   # Rolling Forcing's window rule
        self.scheduler = scheduler(cfg.mode, cfg.step_list, executor.cache.spec, cfg.frames_per_block,
                                   cfg.position_refresh_frames, cfg.max_streams, cfg.t2v, executor.cache.num_rows,
                                   first_step_list=cfg.first_step_list if cfg.first_chunk_steps else None,
                                   first_latents=cfg.first_latent_frames, context_pass=cfg.context_pass)
        self.lanes = Lanes(self.device, cfg.overlap)
        self.guard = InputGuard(cfg.input_guard, cfg.input_limit)   # bad numbers in (input_guard.py)
        self.clock = Clock(self.device)
        # id(vae) -> (vae, VAE states of ended streams): the next stream restarts one in place, so the VAE graphs
        # captured for it replay (a new state is a new graph key: an eager chunk, then a capture, ~0.4 s at 480p)
        self._spare_vae_states: dict[int, tuple[Any, list]] = {}
        self._reencode_states: dict[int, Any] = {}   # id(vae) -> the state Krea's re-encode restarts each time
        self._reencode_skipped: set[int] = set()     # streams told that their context was not re-encoded
        self.listeners: list[Callable] = []
        self._dit_done: Optional[torch.cuda.Event] = None     # the last DiT job's end (decode waits for it)
        self._last_in_flight: tuple = (None, None)             # (stream ids, latents) of the last stream-batch job

    # ------------------------------------------------------------------ events
    def subscribe(self, listener: Callable) -> Callable:
        self.listeners.append(listener)
        return listener

    def unsubscribe(self, listener: Callable) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def _emit(self, event) -> None:
        for listener in self.listeners:
            listener(event)

    @contextlib.contextmanager
    def _stage(self, name: str, streams: list[Stream], frames: list[int], after=()):
        """Run a stage on its lane after ``after`` (events), and tell listeners when it ran (events on that
        lane). Yields a ``StageRun`` whose ``end`` mark later stages wait for."""
        with self.lanes.on(name, after):
            run = StageRun(name, [s.id for s in streams], frames, self.clock.now(), None)
            yield run
            run.end = self.clock.now()
        if self.listeners:
            self._emit(run)

    def _current_event(self) -> Optional[torch.cuda.Event]:
        """An event on the current stream (work issued so far), for a lane to wait for."""
        return self.clock.now().event

    # ------------------------------------------------------------------ streams
    @property
    def num_steps(self) -> int:
        return len(self.cfg.step_list)

    @property
    def weights_are_dummy(self) -> bool:
        parts = (self.executor.dit, self.vae, self.text_encoder)
        return any(getattr(m, "weights_are_dummy", False) for m in parts)

    @torch.no_grad()
    def open(self, prompt: str, seed: Optional[int] = None, *, steps: Optional[int] = None,
             noise_scale: Optional[float] = None, vae=None) -> Stream:
        """A new stream: fresh KV rows, positions, noise controller and VAE state; the prompt encoded.
        ``seed``: this stream's own noise generator (its outputs then do not depend on other streams);
        ``steps`` (first entries of the config's denoising steps), ``noise_scale``, ``vae``: this stream's own."""
        check_prompt(prompt)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64):
            got = f"an integer of {seed.bit_length()} bits" if isinstance(seed, int) else repr(seed)
            raise ValueError(f"seed must be a 64-bit integer (a generator's seed), got {got}")
        step_list = None
        if steps is not None:
            table = list(self.cfg.denoising_steps)
            if not 1 <= steps <= len(table):
                raise ValueError(f"steps={steps}: this engine has denoising steps {table} (1 to {len(table)})")
            step_list = self.cfg.timesteps(table[:steps])
        s = self.scheduler.open(prompt, step_list)
        try:
            noise = self.cfg.noise if noise_scale is None else replace(self.cfg.noise, noise_scale=noise_scale)
            if not 0 < noise.noise_scale <= 1:
                raise ValueError(f"noise_scale must be in (0, 1], got {noise.noise_scale}")
            vae = vae if vae is not None else self.vae
            s.dev = DeviceState(
                t=_timesteps(s.steps, self.device), t_first=_timesteps(s.first_steps, self.device),
                controller=MotionNoiseController(noise, self.device), checks=self.guard.new(self.device),
                generator=self.generator if seed is None else torch.Generator(device=self.device).manual_seed(seed),
                vae=vae, vae_state=self._vae_state(vae) if vae is not None else None, clean=self._clean_frames())
            emb = self._embed(prompt)
            with self.lanes.on("dit", [self._current_event()]):
                self.executor.reset_rows(s.rows)
                self.executor.set_prompt(s.rows, emb)
        except BaseException:
            self.scheduler.close(s)
            raise
        return s

    def capacity(self, steps: Optional[int] = None) -> Optional[str]:
        """None when a stream of ``steps`` steps (default: the config's) can open now, else why not."""
        sch = self.scheduler
        rows = sch.rows_for(steps or len(self.cfg.denoising_steps))
        if len(sch.streams) >= sch.max_streams or len(sch.free_rows) < rows:
            return (f"all {sch.max_streams} stream(s) are in use ({len(sch.free_rows)} of {sch.num_rows} KV rows "
                    f"free, {rows} needed)")
        return None

    def set_noise_scale(self, s: Stream, noise_scale: float) -> None:
        """Change a stream's noise level s0 from its next chunk on (the controller's EMA moves towards it)."""
        if not 0 < noise_scale <= 1:
            raise ValueError(f"noise_scale must be in (0, 1], got {noise_scale}")
        ctl = s.dev.controller
        ctl.cfg = replace(ctl.cfg, noise_scale=noise_scale)
        with self.lanes.on("encode"):   # the controller runs on the encode lane
            ctl.s0.fill_(noise_scale)

    def close(self, s: Stream) -> None:
        """End a stream at once (its rows are free for the next one); call ``flush`` first to drain it."""
        if not s.closed and s.dev is not None and s.dev.vae is not None:
            self._retire_vae_state(s.dev.vae, s.dev.vae_state)
        self.scheduler.close(s)

    def _vae_state(self, vae):
        """A new stream's VAE state: an ended stream's restarted in place when there is one, else a new one. Each
        part is zeroed on the lane that uses it, after the ended stream's last use there (lanes run in order)."""
        spare = self._spare_vae_states.get(id(vae), (None, []))[1]
        if not spare:
            return vae.new_state(1)
        state = spare.pop()
        with self.lanes.on("encode"):
            state.restart(encoder=True, decoder=False)
        with self.lanes.on("decode"):
            state.restart(encoder=False, decoder=True)
        return state

    def _retire_vae_state(self, vae, state) -> None:
        """Keep an ended stream's VAE state (and so its graphs) for the next stream, up to one per stream slot;
        a VAE whose state cannot restart, or one more than that, is released (its graphs dropped)."""
        spare = self._spare_vae_states.setdefault(id(vae), (vae, []))[1]
        if callable(getattr(state, "restart", None)) and len(spare) < self.scheduler.max_streams:
            spare.append(state)
        else:
            release(vae, state)

    def release(self) -> None:
        """The end of this engine: every stream closed, every device tensor it holds given back (KV cache, CUDA
        graphs and their pools, the streams' VAE states and latents); unusable afterwards."""
        for s in list(self.scheduler.streams.values()):
            s.dev = None
            s.buffer.clear()
            self.scheduler.close(s)
        self.listeners.clear()
        for vae, states in self._spare_vae_states.values():
            for state in states:
                release(vae, state)
        self._spare_vae_states.clear()
        self._reencode_states.clear()
        self._last_in_flight, self._dit_done = (None, None), None
        self.executor.release()

    @torch.no_grad()
    def set_prompt(self, s: Stream, prompt: str) -> None:
        """Change a stream's prompt mid-stream: only its rows' cross-attention K/V change."""
        emb = self._embed(prompt)
        with self.lanes.on("dit", [self._current_event()]):
            self.executor.set_prompt(s.rows, emb)
        s.prompt = prompt
        if self.cfg.kv_rebuild and self.cfg.kv_recache:   # LongLive: the history rewritten under the new prompt
            self._rebuild_kv(s, self.cfg.num_kv_cache, keep_sink=self.cfg.kv_recache_global_sink)

    def _clean_frames(self) -> Optional[CleanFrames]:
        if not self.cfg.kv_rebuild:
            return None
        keep = max(self.cfg.num_kv_cache if self.cfg.kv_recache else 0, self.cfg.kv_recompute_frames)
        return CleanFrames(head=self.cfg.sink_frames, keep=keep - self.cfg.sink_frames,
                           pixels=self.cfg.kv_recompute_reencode) if keep else None

    def _rebuild_kv(self, s: Stream, frames: int, keep_sink: bool = False) -> None:
        """Reset the stream's KV rows and write them again from its latest ``frames`` clean latent frames at
        t = 0, under its current prompt (``kv_rebuild.py``); its next chunk follows them. ``keep_sink``: the sink
        frames' keys and values are put back as they were once their blocks are replayed, so the later blocks
        attend to the sink from before (LongLive's global sink)."""
        x = s.dev.clean.latest(frames)
        if x is None:
            return
        if self.cfg.kv_recompute_reencode:
            x = self._reencode_oldest(s, x, frames)
        blocks = replay_blocks(x.shape[1], s.frames_per_block)
        with self.lanes.on("dit", [self._current_event()]):
            sink = self.executor.sink_kv(s.rows) if keep_sink else None
            self.executor.reset_rows(s.rows, keep_memory=True)   # MemFlow's recache keeps its memory bank
            t = torch.zeros(1, 1, dtype=s.dev.t.dtype, device=self.device)
            replayed = 0
            for job, block in zip(self.scheduler.replay_jobs(s, blocks), x.to(self.dtype).split(blocks, dim=1)):
                self.executor.run(job, block, t, None)
                replayed += block.shape[1]
                if sink is not None and replayed == self.cfg.sink_frames:   # validate: the sink is whole blocks
                    self.executor.restore_sink_kv(s.rows, sink)

    def _reencode_oldest(self, s: Stream, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Krea's context: its oldest latent replaced by that latent's last decoded frame encoded alone, as a
        stream's first frame (a fresh VAE state: an image latent), unless it is the stream's own first latent
        (which is one already). The DiT lane waits for that frame's decode."""
        clean = s.dev.clean
        oldest = clean.first_index(frames)
        if oldest == 0:
            return x
        frame = clean.last_frames.get(oldest)
        if frame is None:   # its chunk was not decoded before this one's DiT (the staged API's whole-video calls)
            if s.id not in self._reencode_skipped:
                self._reencode_skipped.add(s.id)
                log.warning("stream %d: kv_recompute_reencode needs each chunk decoded before the next one is "
                            "denoised; the context's oldest latent is replayed as it left the DiT", s.id)
            return x
        vae = s.dev.vae
        with self.lanes.on("dit", [self._current_event(), clean.last_frames_ready]):
            state = self._reencode_states.get(id(vae))
            if state is None:
                state = self._reencode_states[id(vae)] = vae.new_state(1)
            else:
                state.restart()   # same lane as its last use
            z = vae.encode(state, frame[None, :, None].to(self.dtype))
            return torch.cat([z.to(x.dtype), x[:, 1:]], dim=1)

    def dit_jobs(self, chunks: list[Chunk]) -> list[DiTJob]:
        """The scheduler's DiT jobs for encoded chunks, after the KV rebuild of every stream that recomputes its
        context before each chunk (Krea; the rebuild moves the positions the jobs take)."""
        if self.cfg.kv_rebuild and self.cfg.kv_recompute_frames:
            for c in chunks:
                if not c.first:
                    self._rebuild_kv(c.stream, self.cfg.kv_recompute_frames)
        return self.scheduler.dit_jobs(chunks)

    def _embed(self, prompt: str) -> Optional[torch.Tensor]:
        check_prompt(prompt)
        te = self.text_encoder
        if te is None:   # a pipe stage without the text encoder: the first stage sends the prompt's context
            return None
        emb = te.encode(prompt) if hasattr(te, "encode") else te(prompt)
        return emb.to(self.device, self.dtype)

    def frames_needed(self, s: Stream) -> int:
        return self.scheduler.frames_needed(s)

    # ------------------------------------------------------------------ frames in, finished chunks out
    def feed(self, s: Stream, frames: torch.Tensor) -> None:
        """Buffer input frames [3, T, H, W] in [-1, 1] (moved to the device without blocking the host)."""
        self.guard.require(s.id, s.dev.checks)
        frames = self._check_frames(frames)
        self.scheduler.feed(s, frames)
        if frames.shape[1]:
            s.arrivals.append((s.fed, self.clock.host()))   # when frames up to s.fed were all here
    @torch.no_grad()
    def step(self, streams: Optional[list[Stream]] = None) -> list[ChunkOut]:
        """One chunk of every ready stream (or of ``streams``): encode each, one DiT job, decode what finished."""
        pool = streams if streams is not None else list(self.scheduler.streams.values())
        pool = [s for s in pool if s.dev is None or not s.dev.checks.refused]   # stopped after bad numbers
        with self.lanes.on("encode"):   # a chunk spread over pieces is joined where they were copied (feed)
            chunks = [c for c in (self.scheduler.next_chunk(s) for s in pool if self.scheduler.ready(s)) if c]
        for c in chunks:
            if c.frames is not None:
                self._arrived(c)
        return self._run(chunks) if chunks else []

    def _arrived(self, c: Chunk) -> None:
        """Tell listeners when the chunk's last frame was available (the start of its latency)."""
        s = c.stream
        while s.arrivals and s.arrivals[0][0] < s.taken:   # pieces that ended before this chunk's last frame
            s.arrivals.popleft()
        mark = s.arrivals[0][1]
        if self.listeners:
            self._emit(ChunkIn(s.id, c.frames.shape[2], mark))

    @torch.no_grad()
    def push(self, s: Stream, frames: torch.Tensor) -> list[ChunkOut]:
        """Feed frames to one stream and run its chunks until it waits for more input."""
        self.feed(s, frames)
        outs = []
        while self.scheduler.ready(s) and not s.flush_calls:
            outs += self.step([s])
        return outs

    @torch.no_grad()
    def flush(self, s: Stream) -> list[ChunkOut]:
        """End of one stream's input: finish the chunks still in flight. Frames that do not fill a chunk are
        dropped (the VAE takes whole chunks); the number is logged."""
        self._end_input(s)
        outs = []
        while s.flush_calls:
            outs += self.step([s])
        if self.encodes and not self.decodes:   # a first pipe stage reads no output: it checks its input here
            self.verify(s)
        return outs

    @torch.no_grad()
    def flush_latents(self, s: Stream) -> list[torch.Tensor]:
        """``flush`` without the decode: the x0 [1, F, C, h, w] of the chunks still in flight, oldest first (the
        staged API decodes them itself)."""
        self._end_input(s)
        out = []
        while s.flush_calls:
            with self.lanes.on("encode"):
                c = self.scheduler.next_chunk(s)
            out += [x0 for done in self._denoised([c]) for _, x0 in done]
        return out

    def _end_input(self, s: Stream) -> None:
        self.guard.require(s.id, s.dev.checks)
        dropped = self.scheduler.flush(s)
        if dropped:
            log.info("stream %d: %d trailing frame(s) do not fill a chunk and were dropped", s.id, dropped)

    @torch.no_grad()
    def generate(self, s: Stream, num_frames: int) -> list[ChunkOut]:
        """Text-to-video: chunks of pure noise for about ``num_frames`` frames, then the flush."""
        if not self.cfg.t2v:
            raise ValueError("generate() needs PipelineConfig(t2v=True)")
        outs, latents = [], (num_frames - 1) // FRAMES_PER_LATENT + 1
        while latents > 0:
            c = self.scheduler.noise_chunk(s)
            latents -= c.latent_frames
            if self.listeners:
                self._emit(ChunkIn(s.id, FRAMES_PER_LATENT * c.latent_frames, self.clock.host()))
            outs += self._run([c])
        return outs + self.flush(s)

    # ------------------------------------------------------------------ one chunk's path
    def _run(self, chunks: list[Chunk]) -> list[ChunkOut]:
        outs = []
        for done in self._denoised(chunks):                               # job by job: the chunks that finished
            outs += self.decode_chunks([s for s, _ in done], [x0 for _, x0 in done])   # one VAE decode
        return outs

    def _denoised(self, chunks: list[Chunk]) -> Iterator[list[tuple[Stream, torch.Tensor]]]:
        """Encode the chunks (one VAE call), run their DiT jobs; yields, job by job, (stream, x0) of each chunk
        that finished (so a job's outputs are decoded before the next job runs)."""
        encoded = self.encode_chunks(chunks)                             # one VAE encode + motion-aware noise
        for job in self.dit_jobs([e.chunk for e in encoded]):  # first chunks alone; the rest in one job
            mine = [next(e for e in encoded if e.chunk is c) for c in job.chunks]
            done = [(s, x0) for s, x0, emitted in zip(job.streams, self.denoise(job, mine), job.emit) if emitted]
            if done:
                yield done
            self.scheduler.finished(job)

    def encode(self, c: Chunk, previous: Optional[Previous] = None, after=()) -> Encoded:
        """One chunk -> noisy latents; ``previous``: the staged API's explicit controller inputs."""
        return self.encode_chunks([c], {id(c): previous} if previous is not None else None, after)[0]

    def encode_chunks(self, chunks: list[Chunk], previous: Optional[dict] = None, after=()) -> list[Encoded]:
        """Chunks -> noisy latents: one VAE call for the chunks of streams that share a VAE (``_vae_encode``),
        then each chunk noised with its stream's own draws, in chunk order. Chunks after the first go through
        the stream's noise controller, from its own state or from ``previous[id(chunk)]``; all on the encode
        lane, after the events ``after``."""
        for c in chunks:   # a stream stopped after bad numbers takes no more chunks (input_guard.py)
            self.guard.require(c.stream.id, c.stream.dev.checks)
        real = [c for c in chunks if c.frames is not None and self.encodes]
        encoded = {}
        if real:
            with self._stage("encode", [c.stream for c in real], [c.frames.shape[2] for c in real], after) as run:
                for c in real:     # bad values replaced before anything reads them; the first one recorded
                    c.frames = self.guard.check_chunk(c.stream.dev.checks, c.frames)
                    self.lanes.handoff(c.stream.dev.checks.record, "decode")
                noise_levels = [self._noise_level(c, (previous or {}).get(id(c))) for c in real]
                latents = self._vae_encode(real)
                for c, (scale, step) in zip(real, noise_levels):
                    z = latents[id(c)]
                    encoded[id(c)] = Encoded(c, mix_noise(z, self._randn(c.stream, z.shape), scale), scale, step)
                    c.stream.dev.last_frame = c.frames[:, :, -1:]
            for e in encoded.values():
                e.ready = run.end.event
                if e.chunk.real:
                    e.chunk.stream.dev.scales.append(e.scale)
                for t in (e.noisy, e.scale, e.step):
                    self.lanes.handoff(t, "dit")
        return [encoded[id(c)] if id(c) in encoded else self._noise_chunk(c) for c in chunks]

    def _vae_encode(self, chunks: list[Chunk]) -> dict:
        """id(chunk) -> its latents [1, F, 16, h, w]: one VAE call per group of chunks of one VAE, one phase
        (a stream's first chunk is special-cased inside the VAE) and one length."""
        latents = {}
        for group in _groups(chunks, key=lambda c: (id(c.stream.dev.vae), c.first, c.frames.shape[2])):
            video = torch.cat([c.frames for c in group]) if len(group) > 1 else group[0].frames
            z = encode_streams(group[0].stream.dev.vae, [c.stream.dev.vae_state for c in group], video)
            latents.update(zip(map(id, group), z.to(self.dtype).split(1)))
        return latents

    def _noise_level(self, c: Chunk, previous: Optional[Previous]) -> tuple:
        """(scale, step) of a chunk: the stream's s0 for its first chunk, else the controller's (from ``previous``
        when given, the staged API's explicit inputs)."""
        s = c.stream
        if c.first:
            return s.dev.controller.s0, None
        if previous is None:
            scale, step = s.dev.controller.update(c.frames, s.dev.last_frame)
        else:
            scale, step = s.dev.controller.next_scale(c.frames, self._check_frames(previous.last_frame[0])[None],
                                                  self._scalar(previous.scale), self._scalar(previous.initial))
            s.dev.controller.scale = scale
        return scale, self._warped(step)

    def _warped(self, step: torch.Tensor) -> torch.Tensor:
        """A recipe that warps its steps (``warp_denoising_step``) warps the controller's too, so that slot 0 sits
        on the same grid as the list's steps: t -> timesteps[1000 - t], on the device."""
        return self.schedule.warp(step) if self.cfg.warp_denoising_step else step

    def _noise_chunk(self, c: Chunk) -> Encoded:
        """A chunk of pure noise (text-to-video, flush), or (a pipe stage after the first) only its shape."""
        s = c.stream
        shape = (1, c.latent_frames, 16, self.cfg.height // PIXELS_PER_LATENT, self.cfg.width // PIXELS_PER_LATENT)
        if not self.encodes:  # a pipe stage after the first: the chunk's shape is all it needs
            if c.real:
                s.dev.scales.append(None)
            return Encoded(c, torch.empty(shape, device="meta", dtype=self.dtype))
        with self._stage("noise", [s], [0]) as run:
            noisy = self._randn(s, shape)
        self.lanes.handoff(noisy, "dit")
        return Encoded(c, noisy, ready=run.end.event)

    def denoise(self, job: DiTJob, encoded: list[Encoded]) -> list[torch.Tensor]:
        """One DiT job; returns x0 [1, F, C, h, w] per stream (what leaves; placeholders included)."""
        frames = [e.noisy.shape[1] * FRAMES_PER_LATENT + int(e.chunk.first) for e in encoded]
        with self._stage("dit", job.streams, frames, [e.ready for e in encoded]) as run:
            for s, e in zip(job.streams, encoded):
                if e.step is not None:
                    s.dev.t[0] = e.step  # the controller's timestep for slot 0 (kept for later chunks: the reference)
            if job.window is not None:   # Rolling Forcing's window (rolling.py)
                x0 = rolling.denoise(self, job, encoded)
            else:
                x0 = self._stream_batch(job, encoded) if job.stream_batch else self._all_steps(job, encoded)
            for s, x, shown in zip(job.streams, x0, job.emit):
                if shown and s.dev.clean is not None:   # kept for a KV rebuild
                    s.dev.clean.add(x)
        for t in x0:
            self.lanes.handoff(t, "decode")
        self._dit_done = run.end.event
        return x0

    def _all_steps(self, job: DiTJob, encoded: list[Encoded]) -> list[torch.Tensor]:
        x = torch.cat([e.noisy for e in encoded]) if len(encoded) > 1 else encoded[0].noisy
        t = torch.stack([s.dev.t_first if job.first else s.dev.t for s in job.streams], dim=1)   # [passes, R]
        noise = None
        if job.passes > 1:  # one draw per pass and stream, as the reference re-noises between passes
            noise = torch.stack([torch.cat([self._randn(s, e.noisy.shape) for _ in range(job.passes - 1)])
                                 for s, e in zip(job.streams, encoded)], dim=1)  # [passes - 1, R, F, ...]
        x0 = self.executor.run(job, x, t, noise).out
        if job.first and self.scheduler.rule.stream_batch:  # the stream batch starts: every row from row 0 (§2.6)
            s = job.streams[0]
            self.executor.copy_rows(s.rows[0], s.rows[1:])
            s.dev.hidden = torch.zeros(len(s.steps), s.frames_per_block, *x.shape[2:], device=self.latent_device,
                                   dtype=self.dtype)
        return list(x0.split(1))

    def _stream_batch(self, job: DiTJob, encoded: list[Encoded]) -> list[torch.Tensor]:
        n = len(job.rows) // len(job.streams)
        x = self._in_flight(job.streams)
        x.unflatten(0, (-1, n))[:, 0] = torch.cat([e.noisy for e in encoded])   # each stream's new chunk: slot 0
        t = torch.cat([s.dev.t for s in job.streams]) if len(job.streams) > 1 else job.streams[0].dev.t
        noise = torch.zeros_like(x)
        for j, s in enumerate(job.streams):    # re-noise draws per stream, in the reference's order (§2.14)
            rows = noise[j * n:(j + 1) * n - 1]
            if self.cfg.reference_rng_order and n > 2:
                rows.copy_(torch.cat([self._randn(s, (1, *x.shape[1:])) for _ in range(n - 1)]))
            elif n > 1:
                rows.copy_(self._randn(s, rows.shape))
        result = self.executor.run(job, x, t, noise)
        for j, s in enumerate(job.streams):
            s.dev.hidden = result.next_x[j * n:(j + 1) * n]
        self._last_in_flight = ([s.id for s in job.streams], result.next_x)
        return list(result.out.unsqueeze(1).unbind(0))

    def _in_flight(self, streams: list[Stream]) -> torch.Tensor:
        """The streams' in-flight latents as one [R, ...] tensor: the last job's output when these streams still
        hold consecutive views of it (the steady state: no copy), else joined once."""
        ids, ring = self._last_in_flight
        n = len(streams[0].steps)
        if ids == [s.id for s in streams] and all(s.dev.hidden.data_ptr() == ring[j * n].data_ptr()
                                                  and s.dev.hidden.shape == ring[j * n:(j + 1) * n].shape
                                                  for j, s in enumerate(streams)):
            return ring
        return torch.cat([s.dev.hidden for s in streams])

    def decode(self, s: Stream, x0: torch.Tensor) -> ChunkOut:
        """Finished latents of one stream -> its ``ChunkOut`` (``decode_chunks`` for several)."""
        return self.decode_chunks([s], [x0])[0]

    def decode_chunks(self, streams: list[Stream], x0s: list[torch.Tensor]) -> list[ChunkOut]:
        """Finished latents -> frames [T, H, W, 3] in [0, 1] on the device, one ``ChunkOut`` event per stream.
        The streams that share a VAE (and their phase and chunk length) are decoded in one call."""
        if not self.decodes:  # a pipe stage before the last: the last stage decodes (no frames here)
            outs = [ChunkOut(s.id, torch.empty(0, self.cfg.height, self.cfg.width, 3), self.clock.host(),
                             s.dev.scales.popleft() if s.dev.scales else None, s.shown) for s in streams]
            for out in outs:
                self._emit(out)
            return outs
        with self._stage("decode", streams, [FRAMES_PER_LATENT * x0.shape[1] for x0 in x0s], [self._dit_done]) as run:
            frames = self._vae_decode(streams, x0s)
            snaps = {s.id: self.guard.snapshot(s.dev.checks, frames[s.id], s.shown) for s in streams}
        outs = []
        for s in streams:
            self.lanes.handoff(frames[s.id], "current")
            out = ChunkOut(s.id, frames[s.id], run.end, s.dev.scales.popleft() if s.dev.scales else None, s.shown,
                           checks=(s.dev.checks, snaps[s.id]))
            self._emit(out)
            if self.cfg.target_fps:
                self._adapt_chunk_size(s, out)
            outs.append(out)
        return outs

    def _vae_decode(self, streams: list[Stream], x0s: list[torch.Tensor]) -> dict:
        """stream id -> its frames [T, H, W, 3] in [0, 1]: one VAE call per group of streams of one VAE, one
        phase and one chunk length."""
        frames = {}
        def key(p):
            return id(p[0].dev.vae), _first_decode(p[0]), p[1].shape[1]
        for group in _groups(list(zip(streams, x0s)), key=key):
            z = torch.cat([x0 for _, x0 in group]) if len(group) > 1 else group[0][1]
            out = decode_streams(group[0][0].dev.vae, [s.dev.vae_state for s, _ in group], z)
            for (s, x0), f in zip(group, out):
                frames[s.id] = to_unit(f).permute(0, 2, 3, 1)
                if s.dev.clean is not None and s.dev.clean.pixels:   # Krea's re-encode reads them (kv_rebuild.py)
                    s.dev.clean.add_decoded(f, x0.shape[1])
                    s.dev.clean.last_frames_ready = self._current_event()
        return frames

    def _adapt_chunk_size(self, s: Stream, out: ChunkOut) -> None:
        """``target_fps`` (reference §2.11, without needing --profile): once, at the stream's 4th output, the
        interval since the 3rd (CUDA events; one wait, once) gives its speed; below the target, later chunks
        grow to (N - sink - 1) latent frames and the chunks in flight are repeated to that length."""
        s.out_marks.append(out.mark)
        if len(s.out_marks) != 4 or s.frames_per_block != self.cfg.frames_per_block:
            return
        fps = out.frames.shape[0] / max(1e-9, self.clock.seconds(s.out_marks[3]) - self.clock.seconds(s.out_marks[2]))
        grow = self.cfg.num_kv_cache - self.cfg.sink_frames - 1
        if fps < self.cfg.target_fps and grow > s.frames_per_block:
            log.info("stream %d: %.1f FPS < target %.1f: chunks grow to %d latent frames", s.id, fps,
                     self.cfg.target_fps, grow)
            self.scheduler.grow_chunks(s, grow)
            if s.dev.hidden is not None:
                with self.lanes.on("dit"):
                    s.dev.hidden = s.dev.hidden.repeat(1, grow // s.dev.hidden.shape[1], 1, 1, 1)

    # ------------------------------------------------------------------ bad numbers (input_guard.py)
    def verify(self, what: ChunkOut | Stream) -> None:
        """Where the host reads a finished chunk (after its event, or after copying it to the host): raise
        ``InputError`` naming the stream, chunk and frame if its input had non-finite or out-of-range values
        (``input_guard=raise``) or its output went non-finite; warn once (``clamp``). No extra wait for the GPU:
        ``what`` is a ``ChunkOut`` whose event was waited for, or a stream whose last decoded chunk was read."""
        if isinstance(what, ChunkOut):
            if what.checks is not None:
                self.guard.verify(what.stream, *what.checks)
            return
        s = what
        if s.dev is None:
            return
        snap = s.dev.checks.last
        if snap is None and self.guard.on:   # nothing decoded here (a first pipe stage): the input record, once
            if self.lanes.streams is not None:
                torch.cuda.current_stream().wait_stream(self.lanes.stream("encode"))
            snap = torch.cat([s.dev.checks.record, s.dev.checks.out]).cpu()
        self.guard.verify(s.id, s.dev.checks, snap)

    # ------------------------------------------------------------------ helpers
    def _randn(self, s: Stream, shape) -> torch.Tensor:
        if self.latent_device.type == "meta":
            return torch.empty(shape, device="meta", dtype=self.dtype)
        return torch.randn(shape, generator=s.dev.generator, device=self.device, dtype=self.dtype)

    def _scalar(self, value) -> Optional[torch.Tensor]:
        """A noise scale as a float64 device scalar, made where it is used (a float: a fill, no copy)."""
        if value is None or (isinstance(value, torch.Tensor) and value.device == self.device):
            return value
        if isinstance(value, torch.Tensor):
            return value.to(self.device, torch.float64, non_blocking=True)
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def _check_frames(self, frames: torch.Tensor) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[0] != 3:
            raise ValueError(f"frames must be a tensor [3, T, H, W] in [-1, 1], got "
                             f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        if tuple(frames.shape[2:]) != (self.cfg.height, self.cfg.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[3]} but the pipeline runs at "
                             f"{self.cfg.height}x{self.cfg.width}; resize them (sdv2_lab.io.video.load_video does)")
        if not self.encodes:  # only the first pipe stage reads the frames; the others follow their shapes
            return frames.to("meta")
        if frames.device.type == "cpu" and self.device.type == "cuda" and not frames.is_pinned():
            frames = frames.pin_memory()
        with self.lanes.on("encode"):
            # across devices in the source dtype, then cast on the device: a cast on the way would be made on the
            # host, into pageable memory, and the copy from there would block the host
            return frames.to(self.device, non_blocking=True).to(self.dtype)


def _timesteps(steps: list, device) -> torch.Tensor:
    """A stream's timesteps on the device: int64 as the reference keeps them, float32 once warped onto the grid."""
    integral = all(float(t).is_integer() for t in steps)
    return torch.tensor(steps, dtype=torch.long if integral else torch.float32, device=device)


def _groups(items: list, key) -> list[list]:
    """``items`` grouped by ``key``, groups in order of first appearance, items in order within a group."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _first_decode(s: Stream):
    """Whether the stream's VAE has decoded nothing yet (None when its state does not say: decoded alone)."""
    n = getattr(s.dev.vae_state, "latents_in", None)
    return id(s) if n is None else n == 0


def check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a string (a text describing the target style), got "
                        f"{type(prompt).__name__}: {prompt!r:.60}")
    if not prompt.strip():
        raise ValueError("the prompt is empty: give a text describing the target style")


def wait(outs: list[ChunkOut]) -> None:
    """Make the current stream wait for these outputs (no host sync)."""
    for o in outs:
        if o.mark.event is not None:
            torch.cuda.current_stream().wait_event(o.mark.event)


def frames_of(outs: list[ChunkOut], height: int, width: int, device) -> torch.Tensor:
    """The outputs' frames joined: [T, H, W, 3] in [0, 1] (usable on the current stream)."""
    wait(outs)
    if not outs:
        return torch.empty(0, height, width, 3, device=device)
    return torch.cat([o.frames for o in outs])

