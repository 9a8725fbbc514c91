"""The streaming KV cache of the causal Wan DiT (reference.md §1.7), as one typed, inspectable object.

Layout: ``k, v: [L, B, N*S, H, dh]`` -- one allocation for all layers; row b is stream-batch slot b.
Positions are offsets in a virtual, ever-growing token sequence (latent frame j = tokens [j*S, (j+1)*S)).

What lives where, and why:
* Everything that is a deterministic function of the positions (append vs evict, append offsets, valid
  lengths, which rolling slots are registered) is Python ints on the host: the pipeline knows the
  positions, so no device value ever has to be read back (the reference does >100 ``.item()`` per step).
* The eviction queue is data dependent (adaptive sink refresh compares mean keys), so it lives on the
  device as a fixed-capacity deque per (layer, row) and is updated with tensor ops only.

Behaviour that deliberately follows the reference (it changes outputs, so parity needs it):
* the refresh check runs per layer and per row on one-frame chunks only, compares post-RoPE mean keys and
  (un-roped) mean values of each sink frame with the new chunk's, *before* the chunk is written, so early
  checks see all-zero, unwritten sink frames (similarity 0) and queue spurious refreshes;
* a refresh pushes the sink slot to the *front* of the queue (LIFO) and is not re-queued after use;
* rolling slots are registered while appending as ``end_of_chunk + chunk_len`` (the *next* chunk's end),
  de-duplicated against the last registered one, so e.g. N=5, sink=2 rotates over two slots, not three;
* with a cache batch of 1 and several denoising passes over one chunk (``single-wo``), only the last pass
  pops the queue; the earlier passes rewrite the same slot;
* attention covers the whole valid cache in physical (not temporal) order, without a causal mask.

Fixed relative to the reference (no output changes): no host syncs; one batched scatter for all rows'
writes; per-row lengths only while the cache fills (then one static shape); the queue is per cache object,
not hidden module state; a clear error instead of an IndexError when no rolling slot exists; pending
refreshes beyond ``queue_capacity`` are dropped (the reference's list would grow without bound; this only
arises when a refresh fires on several passes of every chunk in ``single-wo``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_heads: int
    head_dim: int
    frame_tokens: int          # S: tokens per latent frame
    num_frames: int            # N: latent frames held (num_kv_cache)
    sink_frames: int = 0       # leading frames kept as attention sinks (num_sink_tokens counts frames)
    refresh_threshold: float = -1.0  # adaptive sink refresh when mean similarity < threshold; -1 = off
    queue_capacity: int = 0    # eviction-queue slots per (layer, row); 0 = num_frames + 64

    def __post_init__(self):
        if self.num_frames < 1 or self.frame_tokens < 1:
            raise ValueError(f"KV cache needs num_frames >= 1 and frame_tokens >= 1, got {self}")
        if not 0 <= self.sink_frames < self.num_frames:
            raise ValueError(f"sink_frames must be in [0, num_frames={self.num_frames}), got {self.sink_frames}")

    @property
    def size(self) -> int:
        return self.num_frames * self.frame_tokens

    @property
    def sink_tokens(self) -> int:
        return self.sink_frames * self.frame_tokens

    @property
    def capacity(self) -> int:
        return self.queue_capacity or self.num_frames + 64

    def bytes(self, batch: int, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * batch * self.size * self.num_heads * self.head_dim * dtype.itemsize


@dataclass
class StepPlan:
    """Host-side decisions for one DiT call, plus the same facts as one small device tensor."""
    num_tokens: int
    starts: list[int]
    evict: list[bool]
    new_local_end: list[int]
    max_len: int                           # keys attended: [0, max_len)
    kv_lens: Optional[torch.Tensor]        # per-row lengths [B] while rows differ, else None (static shape)
    refresh_check: bool
    start_frames: torch.Tensor             # [B] int64 on device: RoPE temporal offset of each row
    append_start: torch.Tensor             # [B] int64 on device (rows that append)
    evict_mask: torch.Tensor               # [B] bool on device
    pop_mask: torch.Tensor                 # [B] bool on device
    register_val: torch.Tensor             # [B] int64 on device, 0 = nothing to register
    pending_current_step: int = 0
    new_rolling: list[Optional[int]] = field(default_factory=list)


class StreamKVCache:
    """Per-stream self-attention KV cache for all layers, plus the per-prompt cross-attention K/V."""

    def __init__(self, spec: CacheSpec, batch_size: int, dtype: torch.dtype, device: torch.device | str,
                 total_steps: int = 1, max_batch_size: Optional[int] = None):
        """``max_batch_size`` reserves rows for a later ``expand_batch`` (stream batch), so expanding copies
        in place instead of allocating a second cache (at 14B / 4 steps that is 28 GiB)."""
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        rows = max(batch_size, max_batch_size or 0)
        shape = (spec.num_layers, rows, spec.size, spec.num_heads, spec.head_dim)
        self._k_rows = torch.zeros(shape, dtype=dtype, device=self.device)
        self._v_rows = torch.zeros(shape, dtype=dtype, device=self.device)
        self.k, self.v = self._k_rows[:, :batch_size], self._v_rows[:, :batch_size]
        q = (spec.num_layers, batch_size)
        self.queue = torch.zeros(*q, spec.capacity, dtype=torch.long, device=self.device)
        self.q_head = torch.zeros(q, dtype=torch.long, device=self.device)
        self.q_len = torch.zeros(q, dtype=torch.long, device=self.device)
        # Host mirrors (deterministic in the positions).
        self.global_end = [0] * batch_size
        self.local_end = [0] * batch_size
        self.rolling: list[list[int]] = [[] for _ in range(batch_size)]
        self.total_steps = self.current_step = total_steps
        # Cross-attention K/V per layer, computed once per prompt: [L, B, H, Ltxt, dh].
        self.cross_k: Optional[torch.Tensor] = None
        self.cross_v: Optional[torch.Tensor] = None
        self._plan_buf = torch.zeros(6, batch_size, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ shape / lifecycle
    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def expand_batch(self, batch_size: int, total_steps: Optional[int] = None) -> None:
        """Replicate row 0 into ``batch_size`` rows (stream batch after the first chunk, §2.6 step 4)."""
        def rep(t):
            return t[:, :1].repeat(1, batch_size, *([1] * (t.dim() - 2))).contiguous()
        if self._k_rows.shape[1] >= batch_size:  # rows reserved up front: fill them in place
            for full in (self._k_rows, self._v_rows):
                full[:, 1:batch_size] = full[:, :1]
            self.k, self.v = self._k_rows[:, :batch_size], self._v_rows[:, :batch_size]
        else:
            self._k_rows, self._v_rows = rep(self.k), rep(self.v)
            self.k, self.v = self._k_rows, self._v_rows
        self.queue, self.q_head, self.q_len = rep(self.queue), rep(self.q_head), rep(self.q_len)
        self.global_end = [self.global_end[0]] * batch_size
        self.local_end = [self.local_end[0]] * batch_size
        self.rolling = [list(self.rolling[0]) for _ in range(batch_size)]
        if self.cross_k is not None:  # [L, B, H, Ltxt, dh]: one row per stream-batch row
            self.cross_k, self.cross_v = rep(self.cross_k), rep(self.cross_v)
        if total_steps is not None:
            self.total_steps = self.current_step = total_steps

    def reset(self) -> None:
        """Forget the stream (keeps the allocation; a new stream must not see the old one's keys)."""
        for t in (self._k_rows, self._v_rows, self.queue, self.q_head, self.q_len):
            t.zero_()
        b = self.batch_size
        self.global_end, self.local_end = [0] * b, [0] * b
        self.rolling = [[] for _ in range(b)]
        self.current_step = self.total_steps
        self.cross_k = self.cross_v = None

    def queue_contents(self, layer: int, row: int) -> list[int]:
        """The eviction queue of one (layer, row), front first (for tests and debugging; syncs)."""
        head, n = int(self.q_head[layer, row]), int(self.q_len[layer, row])
        cap = self.spec.capacity
        return [int(self.queue[layer, row, (head + j) % cap]) for j in range(n)]

    # ------------------------------------------------------------------ per-call protocol
    def plan(self, starts: Sequence[int], num_tokens: int) -> StepPlan:
        """Decide, on the host, what this call does to each row. ``starts``: virtual start token per row."""
        spec, m, b = self.spec, num_tokens, self.batch_size
        if len(starts) != b:
            raise ValueError(f"{len(starts)} row positions for a KV cache of batch {b}")
        if m > spec.size:
            raise ValueError(f"chunk of {m} tokens ({m // spec.frame_tokens} latent frames) is longer than the "
                             f"KV cache ({spec.num_frames} frames = {spec.size} tokens)")
        evict, new_local, append_start, register, pop, new_rolling = [], [], [], [], [], []
        pops_now = not (b == 1 and self.current_step > 1)
        for i, c in enumerate(starts):
            c = int(c)
            if c < 0 or c % spec.frame_tokens:
                raise ValueError(f"row {i}: start {c} is not a non-negative multiple of {spec.frame_tokens}")
            e = c + m
            if e > spec.size or self.local_end[i] >= spec.size:
                if not self.rolling[i]:
                    raise ValueError(
                        f"KV cache of {spec.num_frames} frames with {spec.sink_frames} sink frames has no rolling "
                        f"slot to evict into (the first chunk registers slot end {e}); use num_kv_cache >= "
                        f"max(4, sink + 1)")
                evict.append(True)
                new_local.append(spec.size)
                append_start.append(0)
                register.append(0)
                pop.append(pops_now)
                new_rolling.append(None)
            else:
                local = self.local_end[i] + e - self.global_end[i]
                if local < m:
                    raise ValueError(f"row {i}: start {c} lies before the cached data (local end {local})")
                rolling_end = e + m
                reg = (spec.sink_tokens < rolling_end <= spec.size
                       and (not self.rolling[i] or self.rolling[i][-1] != rolling_end))
                evict.append(False)
                new_local.append(local)
                append_start.append(local - m)
                register.append(rolling_end if reg else 0)
                pop.append(False)
                new_rolling.append(rolling_end if reg else None)
        max_len = max(new_local)
        frames = [int(c) // spec.frame_tokens for c in starts]
        # One small host->device copy per call, from pinned memory so it does not block the host, into a
        # buffer that stays at one address (a captured CUDA graph reads the plan from there).
        packed = torch.tensor([frames, append_start, register, [int(x) for x in evict], [int(x) for x in pop],
                               new_local], dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        if self._plan_buf.shape[1] != b:
            self._plan_buf = torch.zeros(6, b, dtype=torch.long, device=self.device)
        self._plan_buf.copy_(packed, non_blocking=True)
        packed = self._plan_buf
        kv_lens = packed[5] if any(x != max_len for x in new_local) else None
        refresh = spec.sink_frames > 0 and spec.refresh_threshold > -1 and m <= spec.frame_tokens
        next_step = self.current_step
        if any(evict) and b == 1:
            next_step = self.current_step - 1 if self.current_step > 1 else self.total_steps
        return StepPlan(num_tokens=m, starts=[int(c) for c in starts], evict=evict, new_local_end=new_local,
                        max_len=max_len, kv_lens=kv_lens, refresh_check=refresh, start_frames=packed[0],
                        append_start=packed[1], register_val=packed[2], evict_mask=packed[3].bool(),
                        pop_mask=packed[4].bool(), pending_current_step=next_step, new_rolling=new_rolling)

    def update(self, layer: int, plan: StepPlan, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write this layer's new (post-RoPE) keys and values; return the keys/values to attend over.

        k_new, v_new: [B, m, H, dh]. Returns (k [B, Lmax, H, dh], v [B, Lmax, H, dh], kv_lens or None).
        """
        spec, m = self.spec, plan.num_tokens
        b = k_new.shape[0]
        rows = torch.arange(b, device=self.device)
        cap = spec.capacity
        buf, head, length = self.queue[layer], self.q_head[layer], self.q_len[layer]

        if plan.refresh_check:  # adaptive sink refresh (§1.7 step 1), all rows at once
            sinks, s = spec.sink_frames, spec.frame_tokens
            k_sink = self.k[layer, :, : sinks * s].reshape(b, sinks, s, -1).mean(2)
            v_sink = self.v[layer, :, : sinks * s].reshape(b, sinks, s, -1).mean(2)
            k_cur = k_new.reshape(b, 1, m, -1).mean(2)
            v_cur = v_new.reshape(b, 1, m, -1).mean(2)
            sim = (torch.cosine_similarity(k_sink, k_cur, dim=-1) + torch.cosine_similarity(v_sink, v_cur, dim=-1)) / 2
            low, idx = sim.min(dim=1)
            fire = (low < spec.refresh_threshold) & (length < cap)
            head = torch.where(fire, (head - 1) % cap, head)
            buf[rows, head] = torch.where(fire, (idx + 1) * s, buf[rows, head])
            length = length + fire.long()

        # Eviction rows write at the queue head; popping rotates rolling slots to the tail (§1.7 step 2).
        target = buf[rows, head]
        pop = plan.pop_mask
        head = torch.where(pop, (head + 1) % cap, head)
        length = length - pop.long()
        again = pop & (target > spec.sink_tokens)
        tail = (head + length) % cap
        buf[rows, tail] = torch.where(again, target, buf[rows, tail])
        length = length + again.long()
        # Appending rows pre-register the next rolling slot (§1.7 step 3).
        reg = plan.register_val > 0
        tail = (head + length) % cap
        buf[rows, tail] = torch.where(reg, plan.register_val, buf[rows, tail])
        length = length + reg.long()
        self.q_head[layer], self.q_len[layer] = head, length

        # One scatter for all rows: row r's m tokens go to [start_r, start_r + m).
        start = torch.where(plan.evict_mask, target - m, plan.append_start)
        flat = (rows[:, None] * spec.size + start[:, None] + torch.arange(m, device=self.device)[None, :]).reshape(-1)
        kc, vc = self.k[layer].view(-1, *k_new.shape[2:]), self.v[layer].view(-1, *v_new.shape[2:])
        kc.index_copy_(0, flat, k_new.reshape(-1, *k_new.shape[2:]).to(self.dtype))
        vc.index_copy_(0, flat, v_new.reshape(-1, *v_new.shape[2:]).to(self.dtype))
        return self.k[layer, :, : plan.max_len], self.v[layer, :, : plan.max_len], plan.kv_lens

    def commit(self, plan: StepPlan) -> None:
        """Advance the host mirrors after all layers ran this plan."""
        for i, c in enumerate(plan.starts):
            self.global_end[i] = c + plan.num_tokens
            self.local_end[i] = plan.new_local_end[i]
            if plan.new_rolling[i] is not None:
                self.rolling[i].append(plan.new_rolling[i])
        self.current_step = plan.pending_current_step
