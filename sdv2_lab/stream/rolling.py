"""Rolling Forcing's rolling window (TencentARC/RollingForcing: pipeline/rolling_forcing_inference.py,
wan/modules/causal_model.py), a recipe flag (``rolling_window: true``) on top of the engine's parts.

A stream keeps ``n = len(steps)`` blocks in flight, as the stream batch does, but on **one** KV row and in **one**
DiT call: slot i (newest first) sits at level t_i, and the call sees the window oldest first, every frame at its
block's timestep, with full attention inside the window. Its keys: the anchor (the stream's first clean block,
moved in time to sit just before the working frames), the working frames (the latest clean frames before the
window, ``num_kv_cache - window - anchor`` of them) and the window itself; the window writes nothing. After the
call each block's x0 is re-noised to its next level; the block at the last level leaves (emitted), and a pass at
t = 0 over that block alone writes it into the clean ring, attending to the latest ``num_kv_cache`` clean frames,
itself included. Warm-up windows hold only the real blocks (no cache before the first block leaves); the flush
pushes n - 1 noise chunks that do not enter the window, so the window shrinks from the front and frames out =
frames in, n - 1 blocks late.

Pieces: ``RollingScheduler`` (the window's slots and positions, host logic), ``RollingKVCache`` (anchor + clean
ring on the device, host mirrors of what is written), ``run_window`` (the executor's part: the window call, x0,
the t = 0 pass), ``denoise`` (the driver's part: the slots' latents, the re-noise draws).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..backbones.kv_cache import CacheSpec, StreamKVCache
from .scheduler import Chunk, DiTJob, Scheduler


@dataclass(frozen=True)
class Window:
    """One rolling-window call: the real slots ``lo..hi`` (newest..oldest), whether the oldest leaves, the
    window's first latent frame, and a rebase (frames every stored position moves back by; 0: none)."""
    lo: int
    hi: int
    leaves: bool
    start_frame: int
    block: int                 # latent frames per block
    rebase: int = 0

    @property
    def blocks(self) -> int:
        return self.hi - self.lo + 1


class RollingScheduler(Scheduler):
    """The scheduler with the rolling-window rule: one KV row per stream, one job per stream and chunk."""

    def rows_for(self, steps: int) -> int:
        return 1

    def dit_jobs(self, chunks: list[Chunk]) -> list[DiTJob]:
        return [self._window_job(c) for c in chunks]

    def _window_job(self, c: Chunk) -> DiTJob:
        s, n, f = c.stream, len(c.stream.steps), c.latent_frames
        if c.first:
            s.pending_real, s.starts = [False] * (n - 1), [0] * n
        start = self.take_position(s, f) if c.real else s.next_start   # a flush chunk takes no position
        s.starts = [start] + s.starts[:-1]
        slots_real = [c.real] + s.pending_real
        s.pending_real = slots_real[:-1]
        real = [i for i, r in enumerate(slots_real) if r]
        lo, hi = real[0], real[-1]
        S = self.frame_tokens
        first_frame = s.starts[hi] // S
        rebase = 0
        if self.refresh and first_frame >= self.refresh:   # keep RoPE positions small: all move back together
            rebase = first_frame - self.num_kv_cache
            s.starts = [p - rebase * S for p in s.starts]
            s.next_start -= rebase * S
            first_frame -= rebase
        w = Window(lo, hi, leaves=slots_real[-1], start_frame=first_frame, block=f, rebase=rebase)
        return DiTJob([s], [c], rows=[s.rows[0]], starts=[first_frame * S], passes=1, pops=[[False]],
                      stream_batch=False, first=c.first, emit=[w.leaves], context=w.leaves, window=w)

    def take_position(self, s, frames: int) -> int:
        """Positions run on without the base rule's rebase (the window job rebases every stored key instead)."""
        start = s.next_start
        s.next_start = start + frames * self.frame_tokens
        return start


@dataclass
class RollingPlan:
    """One call's cache plan (one row): the host facts and their device copies (one small copy per call)."""
    rows: list[int]
    starts: list[int]
    num_tokens: int
    row_range: tuple[int, int]
    row_index: torch.Tensor          # [1]
    start_frames: torch.Tensor       # [1] the RoPE position of the call's first frame
    read_index: torch.Tensor         # clean-ring tokens attended (temporal order), after the write
    write_index: Optional[torch.Tensor]   # ring tokens the call writes (the t = 0 pass), else None
    anchor_shift: Optional[torch.Tensor]  # [1, A] frames the anchor's keys move (window calls with a cache)
    rebase: Optional[torch.Tensor]   # [1, ring frames] frames the ring's keys move first (all -rebase), else None
    writes_anchor: bool = False      # the stream's first block: also kept as the anchor
    frames_written: int = 0          # the host mirrors' advance at commit: clean frames written ...
    rebase_frames: int = 0           # ... and frames every position moved back


class RollingKVCache(StreamKVCache):
    """Per row: the anchor (the stream's first clean block, its keys at the position they were written) and a
    ring of the latest ``ring`` clean frames (frame counter c in slot c mod ring), post-RoPE keys. Host mirrors:
    clean frames written per row and the rebase offset (a frame's position = its counter - offset)."""
    graphs_per_row = 2   # a call indexes its row on the host: the window's graph and the t = 0 pass's, per stream

    def __init__(self, spec: CacheSpec, rows: int, dtype, device, anchor_frames: int, move_keys, kv_dtype="model"):
        if kv_dtype != "model" or move_keys is None:
            raise ValueError("the rolling window's cache stores keys in the model's dtype and moves them with the "
                             f"model's move_keys; got kv_cache_dtype={kv_dtype}")
        self.anchor = anchor_frames
        self.ring = spec.num_frames - anchor_frames
        super().__init__(spec, rows, dtype, device, kv_dtype=kv_dtype, move_keys=move_keys)

    def _alloc(self, rows: int) -> None:
        super()._alloc(rows)
        self.written = [0] * rows
        self.offset = [0] * rows

    def reset_rows(self, rows, keep_memory: bool = False) -> None:
        super().reset_rows(rows, keep_memory)
        for r in rows:
            self.written[r] = self.offset[r] = 0

    def copy_rows(self, src: int, dst) -> None:
        raise RuntimeError("a rolling-window stream owns one KV row: there is nothing to copy")

    def _ring_tokens(self, first: int, end: int) -> torch.Tensor:
        """Row tokens of clean frames [first, end) (counters), in temporal order: made on the device from host ints."""
        S, dev = self.spec.frame_tokens, self.device
        slots = torch.arange(first, end, device=dev) % self.ring + self.anchor
        return (slots[:, None] * S + torch.arange(S, device=dev)).flatten()

    def plan_window(self, row: int, start_frame: int, frames: int, rebase: int = 0) -> RollingPlan:
        """A window of ``frames`` latent frames from ``start_frame``: anchor + working frames + the window."""
        written, A = self.written[row], self.anchor
        position = written - self.offset[row] - rebase      # where the next clean frame goes: the window's start
        if position != start_frame:
            raise ValueError(f"row {row}: the window starts at frame {start_frame} but its clean frames end at "
                             f"{position}")
        working = min(self.ring - frames - A, written - A) if written else 0
        if working < 0:
            raise ValueError(f"a window of {frames} latent frames and an anchor of {A} do not fit an attention span of "
                             f"{self.ring} frames (num_kv_cache)")
        shift = [start_frame - working - A] * A if written else []   # the anchor was written at position 0
        plan = self._plan(row, start_frame, frames, self._ring_tokens(written - working, written), None, shift, rebase)
        plan.rebase_frames = rebase
        return plan

    def plan_rerun(self, row: int, start_frame: int, frames: int) -> RollingPlan:
        """The t = 0 pass of a leaving block: written into the ring, attending to the latest ``ring`` frames."""
        written = self.written[row]
        if written - self.offset[row] != start_frame:
            raise ValueError(f"row {row}: the leaving block is at frame {start_frame}, its clean frames end at "
                             f"{written - self.offset[row]}")
        if frames > self.ring:
            raise ValueError(f"a block of {frames} latent frames is longer than the clean ring ({self.ring} frames)")
        end = written + frames
        plan = self._plan(row, start_frame, frames, self._ring_tokens(max(0, end - self.ring), end),
                          self._ring_tokens(written, end), [], 0)
        plan.writes_anchor, plan.frames_written = written == 0, frames
        return plan

    def _plan(self, row, start_frame, frames, read, write, shift, rebase) -> RollingPlan:
        packed = torch.tensor([row, start_frame, rebase, *shift], dtype=torch.long)   # one small copy per call
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        dev = packed.to(self.device, non_blocking=True)
        return RollingPlan(rows=[row], starts=[start_frame * self.spec.frame_tokens],
                           num_tokens=frames * self.spec.frame_tokens, row_range=(row, row + 1), row_index=dev[0:1],
                           start_frames=dev[1:2], read_index=read, write_index=write,
                           anchor_shift=dev[3:][None] if shift else None,
                           rebase=-dev[2:3][None].expand(1, self.ring) if rebase else None)

    def update(self, layer: int, plan: RollingPlan, k_new: torch.Tensor, v_new: torch.Tensor):
        li, row = self.local(layer), plan.rows[0]
        k, v = self.k[li, row], self.v[li, row]              # [(A + ring) * S, H, dh]
        A = self.anchor * self.spec.frame_tokens
        if plan.rebase is not None:   # every ring key back by the same frames: what they attend to is unchanged
            k[A:] = self.move_keys(k[None, A:], plan.rebase)[0]
        if plan.write_index is not None:
            k.index_copy_(0, plan.write_index, k_new[0].to(k.dtype))
            v.index_copy_(0, plan.write_index, v_new[0].to(v.dtype))
            if plan.writes_anchor:
                k[:A], v[:A] = k_new[0, :A], v_new[0, :A]
            return k.index_select(0, plan.read_index)[None], v.index_select(0, plan.read_index)[None], None, None
        keys, values = [], []
        if plan.anchor_shift is not None:
            keys.append(self.move_keys(k[None, :A], plan.anchor_shift)[0])
            values.append(v[:A])
        keys += [k.index_select(0, plan.read_index), k_new[0]]
        values += [v.index_select(0, plan.read_index), v_new[0]]
        return torch.cat(keys)[None], torch.cat(values)[None], None, None

    def commit(self, plan: RollingPlan) -> None:
        r = plan.rows[0]
        self.offset[r] += plan.rebase_frames
        self.written[r] += plan.frames_written


def new_cache(dit, cfg, rows: int, dtype, device) -> RollingKVCache:
    """The rolling window's cache: the anchor (one block) and a ring of ``num_kv_cache`` clean frames."""
    spec = dit.cache_spec(cfg.height, cfg.width, cfg.num_kv_cache + cfg.frames_per_block)
    return RollingKVCache(spec, rows, dtype, device, cfg.frames_per_block, dit.move_keys, cfg.kv_cache_dtype)


def run_window(executor, job: DiTJob, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The executor's part of a window job: x [1, W, C, h, w] oldest block first, t [1, W] per-frame timesteps.
    One DiT call over the window, its x0; when the oldest block leaves, one pass at t = 0 over it alone writes it
    into the clean ring. Returns the window's x0 [1, W, ...]."""
    dit, cache, w = executor.dit, executor.cache, job.window
    dit.check_latent(x, cache)
    end = w.start_frame + x.shape[1]
    if end > dit.cfg.rope_max_positions:
        raise ValueError(f"the rolling window reaches temporal position {end}, past rope_max_positions "
                         f"{dit.cfg.rope_max_positions}: set position_refresh_frames (rebase) for long streams")
    row = job.rows[0]
    plan = cache.plan_window(row, w.start_frame, x.shape[1], w.rebase)
    S, A = cache.spec.frame_tokens, cache.anchor
    # steady state (all n blocks in the window, the ring full): the calls' shapes repeat, so they may replay graphs
    full = w.blocks == len(job.streams[0].steps) and plan.read_index.numel() == (cache.ring - A - x.shape[1]) * S
    v = executor.window_step(x, t, plan, steady=full and not w.rebase)
    cache.commit(plan)
    x0 = executor.schedule.velocity_to_x0(v, x, t)
    if w.leaves:   # the clean block into the ring (its output unused)
        block = x0[:, :w.block]
        plan = cache.plan_rerun(row, w.start_frame, w.block)
        executor.window_step(block, torch.zeros_like(t[:, :w.block]), plan,
                             steady=plan.read_index.numel() == cache.ring * S and not plan.writes_anchor)
        cache.commit(plan)
    return x0


def denoise(driver, job: DiTJob, encoded) -> list[torch.Tensor]:
    """The driver's part of a window job: the new block into slot 0 of the stream's in-flight latents, the real
    slots as one window (oldest first) at their slots' timesteps, then each block's x0 re-noised to its next level
    (one draw over the window's blocks per call) and every slot moved on by one. Returns [x0 of the oldest block]
    (what leaves when ``job.emit``)."""
    s, e, w = job.streams[0], encoded[0], job.window
    n = len(s.steps)
    if s.dev.hidden is None or e.chunk.first:
        s.dev.hidden = torch.zeros(n, *e.noisy.shape[1:], device=e.noisy.device, dtype=e.noisy.dtype)
    hidden = s.dev.hidden
    if e.chunk.real:
        hidden[0] = e.noisy[0]
    slots = slice(w.lo, w.hi + 1)
    f = hidden.shape[1]
    x = hidden[slots].flip(0).flatten(0, 1)[None]
    t = s.dev.t[slots].flip(0).repeat_interleave(f)[None]
    noise = driver._randn(s, (w.blocks, *hidden.shape[1:]))
    x0 = driver.executor.run(job, x, t, None).out[0].unflatten(0, (w.blocks, f)).flip(0)   # slot order lo..hi
    t_next = s.dev.t.roll(-1)[slots]                       # slot i -> t_{i+1} (the leaving slot's: unused)
    hidden[slots] = driver.schedule.add_noise(x0, noise, t_next[:, None].expand(-1, f))
    s.dev.hidden = hidden.roll(1, dims=0)                  # slot i + 1 = slot i; slot 0 takes the next block
    return [x0[-1:]]
