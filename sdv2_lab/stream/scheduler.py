"""The scheduler: every stream's input buffer, slots, timesteps and positions, turned into jobs. Pure logic.

It makes no model calls and reads no device value. For each stream it decides which frames form the next
chunk, where that chunk sits in the stream's virtual token sequence (rebased so RoPE positions stay small),
which KV-cache rows it uses, at which timesteps, and which of the DiT's outputs are finished chunks. The
driver (``driver.py``) runs the jobs it makes; executors (``executor.py``) run the DiT part.

A mode is data here (``ModeRule``), not a class calling back into a pipeline:

* ``single`` / ``pipe`` (stream batch): a stream owns ``n`` rows, one per denoising step. Each DiT call moves
  every chunk in flight one step: row 0 takes the new chunk at t_0, row i the chunk that entered i calls ago
  (re-noised to t_i), and the chunk in row n-1 leaves finished (reference.md §2.7);
* ``single-wo``: a stream owns one row; each chunk gets all ``n`` steps in turn (n calls at the same positions,
  re-noised between them); one pass in n rotates the KV eviction ring, counted as the reference counts (§2.8);
* every stream's first chunk (2 latent frames; ``first_latents``) gets all steps at once on its first row, as
  ``single-wo`` does (the reference's ``prepare``, §2.6), with its own step list when the recipe has one
  (``first_step_list``); in stream-batch modes the row is then copied to the stream's other rows;
* ``context_pass`` (Self-Forcing's recipe): an all-steps chunk gets one more pass at t = 0 over its finished x0,
  at the same positions, so the KV cache holds the clean chunk rather than its last noisy step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..backbones.kv_cache import CacheSpec, RowPositions
from ..units import chunk_frames


@dataclass(frozen=True)
class ModeRule:
    name: str
    stream_batch: bool   # one row per denoising step, one DiT call per chunk; else all steps in turn on one row


MODES = {"single": ModeRule("single", True), "single-wo": ModeRule("single-wo", False),
         "pipe": ModeRule("pipe", True)}


@dataclass
class Stream:
    """One stream's schedule: its rows, slots, positions and input bookkeeping (host values). What it carries on
    the device between chunks is the driver's (``dev``)."""
    id: int
    prompt: str
    rows: list[int]                          # KV-cache rows: rows[i] holds denoising step i's history
    steps: list[int]                         # timestep per slot; slot 0's is replaced by the noise controller
    frames_per_block: int                    # latent frames per chunk (target_fps may grow it)
    first_steps: list = field(default_factory=list)   # the first chunk's timesteps (all steps at once)
    starts: list[int] = field(default_factory=list)      # virtual start token of the chunk in each slot
    pending_real: list[bool] = field(default_factory=list)  # slots 0..n-2 after a call: a real chunk still in flight?
    next_start: int = 0                      # virtual start token of the next chunk
    chunks_in: int = 0                       # chunks taken from the input (the first chunk included)
    shown: int = 0                           # finished chunks emitted
    buffer: list = field(default_factory=list)   # input pieces [3, t, H, W] not yet forming a chunk
    buffered: int = 0                        # frames in ``buffer``
    fed: int = 0                             # input frames received so far
    taken: int = 0                           # input frames made into chunks so far
    arrivals: deque = field(default_factory=deque)   # (frames received by then, arrival mark) per input piece
    flush_calls: int = 0                     # noise chunks still to push through the stream batch (flush)
    hide_next_output: bool = False
    out_marks: list = field(default_factory=list)    # target_fps: when the first outputs appeared
    # single-wo: the reference's pass counter and a host mirror of the stream's KV row (which passes evict)
    passes_left: int = 0
    row: RowPositions = field(default_factory=RowPositions)
    closed: bool = False
    dev: Any = None                          # the driver's device state of this stream (driver.DeviceState)

    @property
    def started(self) -> bool:
        return self.chunks_in > 0

    @property
    def in_flight(self) -> bool:
        """Real chunks are still inside the stream batch (flush would emit them)."""
        return any(self.pending_real)


@dataclass
class Chunk:
    """A chunk for the encoder: input frames, or None for a noise chunk (text-to-video, flush)."""
    stream: Stream
    frames: Optional[torch.Tensor]           # [1, 3, T, H, W] in [-1, 1]
    latent_frames: int
    first: bool
    real: bool                               # from the input (flush chunks are not)


@dataclass
class DiTJob:
    """DiT work over KV rows of one or more streams, all of one shape.

    ``passes`` calls over ``rows``: pass k runs at timesteps ``t_k`` of each stream (stream-batch jobs: one
    pass, each row at its slot's timestep), rows at virtual positions ``starts``; ``pops[k]`` says whether an
    evicting row rotates its ring in pass k. ``stream_batch``: after the call each stream's slot i moves to
    slot i + 1 (re-noised to t_{i+1}) and its last slot leaves; ``emit[j]``: whether stream j's leaving chunk is
    shown (not a warm-up placeholder, not flush noise); ``context``: after the passes, one pass at t = 0 over the
    finished x0 writes the KV cache from the clean chunk (its output is not used)."""
    streams: list[Stream]
    chunks: list[Chunk]
    rows: list[int]
    starts: list[int]
    passes: int
    pops: list[list[bool]]
    stream_batch: bool
    first: bool
    emit: list[bool]
    context: bool = False                    # one more pass at t = 0 over the x0 (pops[passes] is its flag)
    window: Any = None                       # a rolling-window call (rolling.Window), run by rolling.py's parts


class Scheduler:
    def __init__(self, mode: str, step_list: list[int], kv: CacheSpec, frames_per_block: int = 1,
                 position_refresh_frames: int = 50, max_streams: int = 1, t2v: bool = False,
                 num_rows: Optional[int] = None, first_step_list: Optional[list] = None,
                 first_latents: Optional[int] = None, context_pass: bool = False):
        """``step_list``: the default timesteps of a stream's slots; ``num_rows``: KV-cache rows to share out
        (default: ``max_streams`` streams of ``len(step_list)`` steps); ``first_step_list``: a first chunk's own
        timesteps (default ``step_list``); ``first_latents``: latent frames of a first chunk (default 1 in t2v,
        else 1 + ``frames_per_block``); ``context_pass``: see the module's docstring."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {sorted(MODES)}")
        self.rule = MODES[mode]
        self.step_list = list(step_list)
        self.kv = kv
        self.frames_per_block, self.num_kv_cache = frames_per_block, kv.num_frames
        self.frame_tokens, self.refresh = kv.frame_tokens, position_refresh_frames
        self.t2v = t2v
        self.first_step_list = list(first_step_list) if first_step_list else None
        self.first_latents = first_latents or (1 if t2v else 1 + frames_per_block)
        self.context_pass = context_pass
        self.max_streams = max_streams
        self.num_rows = num_rows or max_streams * self.rows_for(len(self.step_list))
        self.free_rows = list(range(self.num_rows))
        self.streams: dict[int, Stream] = {}
        self._next_id = 0

    def passes_per_chunk(self, s_steps: list) -> int:
        """DiT passes over one chunk at one position in all-steps jobs (the eviction ring counts them)."""
        return len(s_steps) + int(self.context_pass)

    def rows_for(self, steps: int) -> int:
        """KV-cache rows a stream of ``steps`` steps owns: one per step with the stream batch, else one."""
        return steps if self.rule.stream_batch else 1

    # ------------------------------------------------------------------ streams
    def open(self, prompt: str, step_list: Optional[list[int]] = None) -> Stream:
        """A new stream with fresh positions and the lowest free rows (consecutive when possible).
        ``step_list``: its own timesteps (default the scheduler's)."""
        steps = list(step_list or self.step_list)
        n = self.rows_for(len(steps))
        if len(self.streams) >= self.max_streams or len(self.free_rows) < n:
            raise RuntimeError(f"all {self.max_streams} stream(s) are busy (max_streams={self.max_streams}, "
                               f"{len(self.free_rows)} of {self.num_rows} KV rows free, {n} needed): close one first")
        rows = self._take_rows(n)
        first = list(self.first_step_list or steps)
        s = Stream(id=self._next_id, prompt=prompt, rows=rows, steps=steps, first_steps=first,
                   frames_per_block=self.frames_per_block, passes_left=self.passes_per_chunk(s_steps=steps))
        self._next_id += 1
        self.streams[s.id] = s
        return s

    def _take_rows(self, n: int) -> list[int]:
        free = sorted(self.free_rows)
        for i in range(len(free) - n + 1):
            if free[i + n - 1] - free[i] == n - 1:
                rows = free[i:i + n]
                break
        else:
            rows = free[:n]
        self.free_rows = [r for r in self.free_rows if r not in rows]
        return rows

    def close(self, s: Stream) -> None:
        if s.closed:
            return
        s.closed = True
        self.free_rows += s.rows
        self.streams.pop(s.id, None)

    # ------------------------------------------------------------------ input
    def frames_needed(self, s: Stream) -> int:
        """Input frames that make the stream's next chunk (first chunk: 1 + 4k, as the reference: 5)."""
        if not s.started:
            return chunk_frames(self.first_latents - 1, first=True)
        return chunk_frames(s.frames_per_block, first=False)

    def feed(self, s: Stream, frames: torch.Tensor) -> None:
        if frames.shape[1]:
            s.buffer.append(frames)
            s.buffered += frames.shape[1]
            s.fed += frames.shape[1]

    def ready(self, s: Stream) -> bool:
        return s.buffered >= self.frames_needed(s) or s.flush_calls > 0

    def next_chunk(self, s: Stream) -> Optional[Chunk]:
        """The stream's next chunk from its buffered input (sliced, not copied, when one piece holds it), or a
        flush noise chunk, or None."""
        need = self.frames_needed(s)
        if s.buffered >= need:
            head = s.buffer[0]
            if head.shape[1] < need:  # a chunk spread over several pieces: join them once
                head = torch.cat(s.buffer, dim=1)
                s.buffer = [head]
            frames, rest = head[:, :need], head[:, need:]
            s.buffer = ([rest] if rest.shape[1] else []) + s.buffer[1:]
            s.buffered -= need
            s.taken += need
            return self._chunk(s, frames[None], real=True)
        if s.flush_calls > 0:
            s.flush_calls -= 1
            return self._chunk(s, None, real=False)
        return None

    def noise_chunk(self, s: Stream) -> Chunk:
        """A chunk of pure noise (text-to-video input)."""
        return self._chunk(s, None, real=True)

    def chunk(self, s: Stream, frames: torch.Tensor) -> Chunk:
        """A chunk made by the caller (the staged API): frames [1, 3, T, H, W] with T what the stream needs."""
        need = self.frames_needed(s)
        if frames.dim() != 5 or frames.shape[2] != need:
            raise ValueError(f"this stream's next chunk needs {need} frames [1, 3, {need}, H, W], got "
                             f"{tuple(frames.shape)}")
        return self._chunk(s, frames, real=True)

    def _chunk(self, s: Stream, frames, real: bool) -> Chunk:
        first = not s.started
        f = self.first_latents if first else s.frames_per_block
        s.chunks_in += 1
        return Chunk(s, frames, f, first, real)

    def flush(self, s: Stream) -> int:
        """End of the stream's input: schedule noise chunks until every real chunk has left the stream batch.
        Returns the frames left in the buffer (they do not fill a chunk and are dropped)."""
        if not s.started:
            raise ValueError(f"the input ended before the first chunk ({self.frames_needed(s)} frames) was complete; "
                             f"{s.buffered} frame(s) arrived")
        dropped = s.buffered
        s.buffer, s.buffered = [], 0
        # the newest real chunk sits in slot j and leaves after n-1-j more calls
        real = [j for j, r in enumerate(s.pending_real) if r]
        s.flush_calls = len(s.pending_real) - real[0] if real else 0
        return dropped

    # ------------------------------------------------------------------ positions
    def take_position(self, s: Stream, frames: int) -> int:
        """Virtual start token of the stream's next chunk, rebased at ``position_refresh_frames`` (§2.10)."""
        S = self.frame_tokens
        start = s.next_start
        if self.refresh and start // S >= self.refresh:
            start = (self.num_kv_cache - 1) * S  # lands on the eviction branch, keeps RoPE positions small
        s.next_start = start + frames * S
        return start

    # ------------------------------------------------------------------ jobs
    def dit_jobs(self, chunks: list[Chunk]) -> list[DiTJob]:
        """Group encoded chunks into DiT jobs: each stream's first chunk alone (2 latent frames, all steps);
        the rest, one job for all streams (their chunks have one shape)."""
        jobs = [self._first_job(c) for c in chunks if c.first]
        rest = [c for c in chunks if not c.first]
        by_shape: dict[tuple, list[Chunk]] = {}
        for c in rest:
            by_shape.setdefault((c.latent_frames, len(c.stream.steps)), []).append(c)
        for group in by_shape.values():
            jobs.append(self._batch_job(group) if self.rule.stream_batch else self._sequential_job(group))
        return jobs

    def _first_job(self, c: Chunk) -> DiTJob:
        s, n = c.stream, len(c.stream.steps)
        start = self.take_position(s, c.latent_frames)
        if self.rule.stream_batch:
            s.starts = [s.next_start] * n       # empty slots sit at the next position until chunks arrive
            s.pending_real = [False] * (n - 1)
            s.hide_next_output = self.t2v
        passes = len(s.first_steps)
        return DiTJob([s], [c], rows=[s.rows[0]], starts=[start], passes=passes,
                      pops=[[p] for p in self._pass_pops(s, start, c.latent_frames, passes + self.context_pass)],
                      stream_batch=False, first=True, emit=[True], context=self.context_pass)

    def _sequential_job(self, chunks: list[Chunk]) -> DiTJob:
        n = len(chunks[0].stream.steps)
        streams = [c.stream for c in chunks]
        starts = [self.take_position(s, c.latent_frames) for s, c in zip(streams, chunks)]
        per_stream = [self._pass_pops(s, start, c.latent_frames, n + self.context_pass)
                      for s, c, start in zip(streams, chunks, starts)]
        return DiTJob(streams, chunks, rows=[s.rows[0] for s in streams], starts=starts, passes=n,
                      pops=[list(p) for p in zip(*per_stream)], stream_batch=False, first=False,
                      emit=[c.real for c in chunks], context=self.context_pass)

    def _pass_pops(self, s: Stream, start: int, frames: int, passes: int) -> list[bool]:
        """Which of a chunk's passes (all steps at one position, batch 1) rotate the eviction ring. The
        reference counts passes that evict and pops on every n-th (§1.7 step 2): the count runs on across
        chunks, so after the chunk where the cache becomes full the pop falls on a chunk's first pass."""
        m, n, pops = frames * self.frame_tokens, self.passes_per_chunk(s.steps), []
        for _ in range(passes):
            pop = False
            if s.row.advance(self.kv, start, m, where=f"stream {s.id}").evict:
                pop = s.passes_left <= 1
                s.passes_left = n if pop else s.passes_left - 1
            pops.append(pop)
        return pops

    def _batch_job(self, chunks: list[Chunk]) -> DiTJob:
        rows, starts, emit = [], [], []
        for c in chunks:
            s = c.stream
            start = self.take_position(s, c.latent_frames)
            s.starts = [start] + s.starts[:-1]
            slots_real = [c.real] + s.pending_real
            s.pending_real = slots_real[:-1]
            leaving = slots_real[-1]
            if leaving and s.hide_next_output:
                s.hide_next_output = False  # as the reference's t2v loop: its first stream-batch output is not shown
                leaving = False
            rows += s.rows
            starts += s.starts
            emit.append(leaving)
        pops = [[True] * len(rows)]
        return DiTJob([c.stream for c in chunks], chunks, rows=rows, starts=starts, passes=1, pops=pops,
                      stream_batch=True, first=False, emit=emit)

    def replay_jobs(self, s: Stream, blocks: list[int]) -> list[DiTJob]:
        """A KV rebuild (``kv_rebuild.py``) of a stream whose row was just reset: one pass at t = 0 per block of
        clean latent frames (sizes ``blocks``) from position 0; the stream's positions restart there, so its next
        chunk follows them. All-steps modes (one row per stream)."""
        S = self.frame_tokens
        s.row, s.passes_left, s.next_start = RowPositions(), self.passes_per_chunk(s.steps), 0
        jobs = []
        for f in blocks:
            start, s.next_start = s.next_start, s.next_start + f * S
            pop = s.row.advance(self.kv, start, f * S, where=f"stream {s.id} (kv rebuild)").evict
            jobs.append(DiTJob([s], [], rows=[s.rows[0]], starts=[start], passes=1, pops=[[pop]],
                               stream_batch=False, first=False, emit=[False]))
        return jobs

    def finished(self, job: DiTJob) -> None:
        """Book the chunks a job emitted."""
        for s, e in zip(job.streams, job.emit):
            s.shown += int(e)

    def grow_chunks(self, s: Stream, frames_per_block: int) -> None:
        """``target_fps``: later chunks of this stream hold ``frames_per_block`` latent frames."""
        s.frames_per_block = frames_per_block

