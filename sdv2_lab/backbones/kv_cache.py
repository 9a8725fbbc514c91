"""The streaming KV cache of the causal Wan DiT (reference.md §1.7), as one typed, inspectable pool of rows.

Layout: ``k, v: [L, R, N*S, H, dh]`` -- one allocation for a range of layers (all of them on one GPU, a
contiguous slice in ``pipe`` mode) and ``R`` rows. A row is one KV history: a stream-batch slot of one stream
(a stream in ``single`` mode owns ``steps`` rows, in ``single-wo`` one). Several streams share the pool, so one
DiT call can serve rows of several streams. Positions are offsets in a virtual, ever-growing token sequence
(latent frame j = tokens [j*S, (j+1)*S)).

What lives where, and why:
* Everything that is a deterministic function of the positions (append vs evict, append offsets, valid
  lengths, which rolling slots are registered) is Python ints on the host: the caller knows the positions,
  so no device value ever has to be read back (the reference does >100 ``.item()`` per step).
* The eviction queue is data dependent (adaptive sink refresh compares mean keys), so it lives on the
  device as a fixed-capacity deque per (layer, row) and is updated with tensor ops only.
* Whether an evicting call pops the queue is the caller's decision (``pop``): the cache knows nothing of
  denoising steps. ``single-wo`` passes over one chunk several times and pops on one pass in n (the scheduler counts).

Behaviour that deliberately follows the reference (it changes outputs, so parity needs it):
* the refresh check runs per layer and per row on one-frame chunks only, compares post-RoPE mean keys and
  (un-roped) mean values of each sink frame with the new chunk's, *before* the chunk is written, so early
  checks see all-zero, unwritten sink frames (similarity 0) and queue spurious refreshes;
* a refresh pushes the sink slot to the *front* of the queue (LIFO) and is not re-queued after use;
* rolling slots are registered while appending as ``end_of_chunk + chunk_len`` (the *next* chunk's end),
  de-duplicated against the last registered one, so e.g. N=5, sink=2 rotates over two slots, not three;
* attention covers the whole valid cache in physical (not temporal) order, without a causal mask.

Fixed relative to the reference (no output changes): no host syncs; one batched scatter for all rows'
writes; per-row lengths only while the cache fills (then one static shape); the queue is per cache object,
not hidden module state; a clear error instead of an IndexError when no rolling slot exists; pending
refreshes beyond ``queue_capacity`` are dropped (the reference's list would grow without bound; this only
arises when a refresh fires on several passes of every chunk in ``single-wo``).
Storage (``kv_dtype``): keys and values in the model's dtype (``model``, the default), or quantised to
``int8`` / ``fp8`` (e4m3) with one float32 scale per (token, head) — the absmax over ``head_dim`` — written with the
token, so a write never rescales what is already stored and every shape stays static (CUDA graphs). Sinks and
evicted slots move scales with values because both are indexed by the same token slot. Reads dequantise the rows
a call attends over into the model's dtype; the sink check sees the dequantised keys, in fp32.

One deliberate numeric difference: the refresh similarity is computed in fp32 (``sink_similarity``; the
reference's is bf16), so a decision never hangs on one bf16 ulp (it can differ from the reference's only there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .memory import MemoryBank, MemoryPlan


# storage name -> (dtype of the stored bits, what they mean, largest magnitude); None: the model's dtype, unscaled.
# fp8 is kept as its raw bytes (uint8): row fills, copies and gathers then work on every device.
KV_DTYPES = {"model": None, "int8": (torch.int8, torch.int8, 127.0),
             "fp8": (torch.uint8, torch.float8_e4m3fn, 448.0)}


def check_kv_dtype(name: str) -> str:
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r}: expected one of {', '.join(KV_DTYPES)}")
    return name


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., dh] -> (values in the storage dtype, float32 scales [...]): one scale per vector (token, head)."""
    stored, meaning, qmax = KV_DTYPES[kind]
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / qmax
    q = xf / scale[..., None]
    q = q.round().clamp_(-qmax, qmax).to(meaning) if meaning == torch.int8 else q.to(meaning)
    return q.view(stored), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
    return (q.view(KV_DTYPES[kind][1]).float() * scale[..., None]).to(dtype)


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
    sink_ema: float = 0.0      # > 0: an EMA sink (Reward Forcing): evicted frames folded into the sink with this
                               # weight on the sink, sink = a * sink + (1 - a) * evicted; 0 = off
    key_bias: float = 1.0      # < 1: Krea's KV attention bias: attention to the cache's past frames (neither its
                               # first frame nor the call's own tokens) is scaled by this (log(b) added to scores)
    memory_frames: int = 0     # > 0: MemFlow's memory bank of this many latent frames beside the window (memory.py)
    memory_interval: int = 1   # the bank records the first frame of every n-th block's context pass

    def __post_init__(self):
        if self.num_frames < 1 or self.frame_tokens < 1:
            raise ValueError(f"KV cache needs num_frames >= 1 and frame_tokens >= 1, got {self}")
        if not 0 <= self.sink_frames < self.num_frames:
            raise ValueError(f"sink_frames must be in [0, num_frames={self.num_frames}), got {self.sink_frames}")
        if not 0 <= self.sink_ema < 1:
            raise ValueError(f"sink_ema must be in [0, 1) (0 = off), got {self.sink_ema}")
        if not 0 < self.key_bias <= 1:
            raise ValueError(f"kv_attention_bias must be in (0, 1] (1 = off), got {self.key_bias}")
        if isinstance(self.memory_frames, bool) or not isinstance(self.memory_frames, int) or self.memory_frames < 0:
            raise ValueError(f"memory_frames must be 0 (off) or a positive number of latent frames, got "
                             f"{self.memory_frames!r}")
        if isinstance(self.memory_interval, bool) or not isinstance(self.memory_interval, int) \
                or self.memory_interval < 1:
            raise ValueError(f"memory_record_interval must be a positive number of blocks, got "
                             f"{self.memory_interval!r}")
        if self.memory_frames and self.key_bias < 1:
            raise ValueError(f"memory_frames={self.memory_frames} (MemFlow's memory bank) and kv_attention_bias="
                             f"{self.key_bias} (Krea's) do not combine: the bias covers the window's keys only")
        if self.sink_ema and (self.sink_frames < 1 or self.refresh_threshold > -1):
            raise ValueError(f"an EMA sink (sink_ema={self.sink_ema}) needs sink_frames >= 1 and no adaptive refresh "
                             f"(adapt_sink_threshold=-1), got sink_frames={self.sink_frames}, threshold "
                             f"{self.refresh_threshold}")

    @property
    def size(self) -> int:
        return self.num_frames * self.frame_tokens

    @property
    def sink_tokens(self) -> int:
        return self.sink_frames * self.frame_tokens

    @property
    def capacity(self) -> int:
        return self.queue_capacity or self.num_frames + 64

    def bytes(self, rows: int, dtype: torch.dtype, layers: Optional[int] = None) -> int:
        layers = self.num_layers if layers is None else layers
        return 2 * layers * rows * self.size * self.num_heads * self.head_dim * dtype.itemsize


@dataclass
class StepPlan:
    """Host-side decisions for one DiT call over some rows, plus the same facts as one small device tensor."""
    rows: list[int]                        # pool rows, one per batch row of the call
    num_tokens: int
    starts: list[int]
    evict: list[bool]
    new_local_end: list[int]
    max_len: int                           # keys attended: [0, max_len)
    row_range: Optional[tuple[int, int]]   # (first, end) when rows are consecutive: caches are sliced, not gathered
    kv_lens: Optional[torch.Tensor]        # per-row lengths [B] while rows differ, else None (static shape)
    refresh_check: bool
    row_index: torch.Tensor                # [B] int64 on device: the pool rows
    start_frames: torch.Tensor             # [B] int64 on device: RoPE temporal offset of each row
    append_start: torch.Tensor             # [B] int64 on device (rows that append)
    evict_flag: torch.Tensor               # [B] int64 on device, 1 = the row evicts
    pop_flag: torch.Tensor                 # [B] int64 on device, 1 = the evicting row rotates its ring
    register_val: torch.Tensor             # [B] int64 on device, 0 = nothing to register
    fresh_flag: Optional[torch.Tensor] = None   # [B] int64 on device, 1 = the row writes past its last call's end
                                           # (a new chunk, not another pass over the same one)
    new_rolling: list[Optional[int]] = field(default_factory=list)
    memory: Optional[MemoryPlan] = None    # MemFlow's memory bank: what this call reads and records (memory.py)

    # The masks are made where they are used: every device fact of a plan is a view of its one buffer, so a
    # CUDA graph that captured a call reads the next call's plan from there (a mask made here would be baked in).
    @property
    def evict_mask(self) -> torch.Tensor:
        return self.evict_flag != 0

    @property
    def pop_mask(self) -> torch.Tensor:
        return self.pop_flag != 0

    def select(self, rows: slice) -> "StepPlan":
        """The part of this plan for some of its batch rows (a slice of the call's batch, e.g. ``slice(i, None, n)``:
        stream-batch slot i of every stream). Attention keeps the whole call's key length and per-row lengths, so
        each row attends exactly as it does in the whole call (a ``pipe`` stage runs a job's rows in parts)."""
        def part(values):
            return values[rows]
        picked = part(self.rows)
        consecutive = bool(picked) and picked == list(range(picked[0], picked[0] + len(picked)))
        return replace(self, rows=picked, starts=part(self.starts), evict=part(self.evict),
                       new_local_end=part(self.new_local_end),
                       row_range=(picked[0], picked[0] + len(picked)) if consecutive else None,
                       kv_lens=None if self.kv_lens is None else part(self.kv_lens),
                       row_index=part(self.row_index), start_frames=part(self.start_frames),
                       append_start=part(self.append_start), evict_flag=part(self.evict_flag),
                       pop_flag=part(self.pop_flag), register_val=part(self.register_val),
                       fresh_flag=None if self.fresh_flag is None else part(self.fresh_flag),
                       new_rolling=part(self.new_rolling))


@dataclass(frozen=True)
class RowDecision:
    evict: bool                # the eviction branch (cache full): write at the ring's head slot
    local_end: int             # physical end of valid data after the call
    append_start: int          # where an appending call writes (unused when evicting)
    register: Optional[int]    # rolling slot end registered by this call, if any


def decide(spec: CacheSpec, global_end: int, local_end: int, rolling: Sequence[int], start: int, m: int,
           where: str = "row") -> RowDecision:
    """What one call of ``m`` tokens at virtual ``start`` does to a row (§1.7 steps 2-3): pure host logic,
    also used to dry-run a configuration before any model is built."""
    if start < 0 or start % spec.frame_tokens:
        raise ValueError(f"{where}: start {start} is not a non-negative multiple of {spec.frame_tokens}")
    e = start + m
    if e > spec.size or local_end >= spec.size:
        if not rolling:
            raise ValueError(
                f"KV cache of {spec.num_frames} frames with {spec.sink_frames} sink frames has no rolling slot to "
                f"evict into (chunks of {m // spec.frame_tokens} latent frames register none): use a larger "
                f"num_kv_cache or fewer sink frames")
        return RowDecision(True, spec.size, 0, None)
    local = local_end + e - global_end
    if local < m:
        raise ValueError(f"{where}: start {start} lies before the cached data (local end {local})")
    rolling_end = e + m
    reg = spec.sink_tokens < rolling_end <= spec.size and (not rolling or rolling[-1] != rolling_end)
    return RowDecision(False, local, local - m, rolling_end if reg else None)


@dataclass
class RowPositions:
    """One row's host-side position state (what ``decide`` reads), advanced call by call: the scheduler's mirror
    of a row (which passes evict) and the config's dry run use it; the cache keeps the same per row."""
    global_end: int = 0
    local_end: int = 0
    rolling: list = field(default_factory=list)

    def advance(self, spec: CacheSpec, start: int, m: int, where: str = "row") -> RowDecision:
        d = decide(spec, self.global_end, self.local_end, self.rolling, start, m, where)
        self.global_end, self.local_end = start + m, d.local_end
        if d.register is not None:
            self.rolling.append(d.register)
        return d


def sink_similarity(k_sink: torch.Tensor, v_sink: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    sinks: int) -> torch.Tensor:
    """The adaptive sink refresh's similarity [B, sinks] of each sink frame with the new chunk: the mean of the
    cosine similarities of their mean keys and of their mean values. In fp32 whatever the cache's dtype: in bf16
    one ulp at 0.5 is 0.004, so a similarity within an ulp of the threshold would decide by rounding (the
    reference computes it in bf16; this is the value it approximates).

    k_sink, v_sink: [B, sinks * S, H, dh]; k_new, v_new: [B, m, H, dh]."""
    b, f32 = k_new.shape[0], torch.float32
    # the means accumulate in fp32 inside the reduction: no fp32 copy of the sink (28 MB a layer at 480x832)
    k_s = k_sink.reshape(b, sinks, -1, k_sink.shape[-2] * k_sink.shape[-1]).mean(2, dtype=f32)
    v_s = v_sink.reshape(b, sinks, -1, v_sink.shape[-2] * v_sink.shape[-1]).mean(2, dtype=f32)
    k_c = k_new.reshape(b, 1, k_new.shape[1], -1).mean(2, dtype=f32)
    v_c = v_new.reshape(b, 1, v_new.shape[1], -1).mean(2, dtype=f32)
    return (torch.cosine_similarity(k_s, k_c, dim=-1) + torch.cosine_similarity(v_s, v_c, dim=-1)) / 2


class StreamKVCache:
    """Self-attention KV rows for layers ``[first_layer, first_layer + L)``, plus per-row cross-attention K/V."""

    def __init__(self, spec: CacheSpec, rows: int, dtype: torch.dtype, device: torch.device | str,
                 layers: Optional[tuple[int, int]] = None, kv_dtype: str = "model",
                 move_keys: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None):
        """``rows``: how many KV histories the pool holds. ``layers``: the (first, end) layer range this pool
        serves (a ``pipe`` stage holds only its own layers); default all of ``spec.num_layers``. ``dtype``: the
        model's (what attention reads); ``kv_dtype``: how keys and values are stored (``KV_DTYPES``).
        ``move_keys(k [B, F*S, H, dh], frames [B, F])``: the model's post-RoPE keys moved that many latent frames
        in time (an EMA sink folds evicted keys into the sink at the sink's positions)."""
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.kv_dtype = check_kv_dtype(kv_dtype)
        if spec.sink_ema and (move_keys is None or kv_dtype != "model"):
            raise ValueError("an EMA sink needs the model's move_keys (its RoPE) and kv_cache_dtype=model, got "
                             f"move_keys={move_keys}, kv_cache_dtype={kv_dtype}")
        self.move_keys = move_keys
        self.first_layer, self.end_layer = layers if layers is not None else (0, spec.num_layers)
        if not 0 <= self.first_layer < self.end_layer <= spec.num_layers:
            raise ValueError(f"layer range {layers} outside [0, {spec.num_layers})")
        self._static_plans: dict[tuple, torch.Tensor] = {}   # row set -> the device buffer of its static plans
        self._alloc(rows)

    def _alloc(self, rows: int) -> None:
        spec, n_layers = self.spec, self.end_layer - self.first_layer
        shape = (n_layers, rows, spec.size, spec.num_heads, spec.head_dim)
        stored = KV_DTYPES[self.kv_dtype]
        self.k = torch.zeros(shape, dtype=stored[0] if stored else self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=stored[0] if stored else self.dtype, device=self.device)
        # per (token, head) scales of quantised storage; None when stored in the model's dtype
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device) if stored else None
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device) if stored else None
        self.queue = torch.zeros(n_layers, rows, spec.capacity, dtype=torch.long, device=self.device)
        self.q_head = torch.zeros(n_layers, rows, dtype=torch.long, device=self.device)
        self.q_len = torch.zeros(n_layers, rows, dtype=torch.long, device=self.device)
        # EMA sink: the temporal position (latent frame) of what each physical frame slot holds
        self.pos = torch.zeros(n_layers, rows, spec.num_frames, dtype=torch.long, device=self.device) \
            if spec.sink_ema else None
        # Host mirrors (deterministic in the positions), per row.
        self.global_end = [0] * rows
        self.local_end = [0] * rows
        self.memory = MemoryBank(spec.memory_frames, spec.memory_interval, spec.frame_tokens, n_layers, rows,
                                 spec.num_heads, spec.head_dim, self.dtype, self.device) if spec.memory_frames else None
        self.rolling: list[list[int]] = [[] for _ in range(rows)]
        # Cross-attention K/V per layer and row, computed once per prompt: [L, R, H, Ltxt, dh].
        self.cross_k: Optional[torch.Tensor] = None
        self.cross_v: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ rows
    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Device bytes of the self-attention keys and values (with their scales)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)

    def _scaled(self) -> list[torch.Tensor]:
        return [t for t in (self.k_scale, self.v_scale) if t is not None]

    def _positions(self) -> list[torch.Tensor]:
        return [] if self.pos is None else [self.pos]

    def _read(self, li: int, plan: StepPlan, which: str, tokens: Optional[int] = None) -> torch.Tensor:
        """The call's rows of one layer's keys or values in the model's dtype (dequantised when stored so)."""
        q = self._rows(getattr(self, which)[li], plan)
        q = q if tokens is None else q[:, :tokens]
        scale = getattr(self, f"{which}_scale")
        if scale is None:
            return q
        s = self._rows(scale[li], plan)
        return dequantize_kv(q, s if tokens is None else s[:, :tokens], self.dtype, self.kv_dtype)

    @property
    def batch_size(self) -> int:  # a cache made for one stream: its rows are its batch
        return self.num_rows

    def local(self, layer: int) -> int:
        """Index of a model layer inside this pool (a ``pipe`` stage holds a slice of the layers)."""
        i = layer - self.first_layer
        if not 0 <= i < self.k.shape[0]:
            raise IndexError(f"layer {layer} is not held by this cache (layers {self.first_layer}..{self.end_layer - 1})")
        return i

    def reset_rows(self, rows: Sequence[int], keep_memory: bool = False) -> None:
        """Forget what these rows held (a new stream must not see an old one's keys); keeps the allocation.
        ``keep_memory``: the memory bank stays (a KV rebuild of the same stream, as MemFlow's recache keeps it)."""
        if self.memory is not None and not keep_memory:
            self.memory.reset_rows(rows)
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        for t in (self.k, self.v, self.queue, self.q_head, self.q_len, *self._scaled(), *self._positions()):
            t.index_fill_(1, idx, 0)
        for r in rows:
            self.global_end[r] = self.local_end[r] = 0
            self.rolling[r] = []

    def sink_kv(self, rows: Sequence[int]) -> list[torch.Tensor]:
        """A copy of these rows' sink frames (keys, values and their scales): what a recache that keeps the sink
        puts back (``restore_sink_kv``)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        n = self.spec.sink_tokens
        return [t[:, :, :n].index_select(1, idx) for t in (self.k, self.v, *self._scaled())]

    def restore_sink_kv(self, rows: Sequence[int], saved: list[torch.Tensor]) -> None:
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        n = self.spec.sink_tokens
        for t, kept in zip((self.k, self.v, *self._scaled()), saved):
            t[:, idx, :n] = kept

    def reset(self) -> None:
        self.reset_rows(range(self.num_rows))
        self.cross_k = self.cross_v = None

    def release(self) -> None:
        """Give back the pool's device memory (a closed pipeline): rows of zero length, no plans, no prompts."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        self.k = self.v = empty
        self.queue = self.q_head = self.q_len = torch.empty(0, dtype=torch.long, device=self.device)
        self.k_scale = self.v_scale = None
        self.memory = None
        self.pos = None if self.pos is None else torch.empty(0, dtype=torch.long, device=self.device)
        self.cross_k = self.cross_v = None
        self._static_plans.clear()

    def copy_rows(self, src: int, dst: Sequence[int]) -> None:
        """Replicate row ``src`` into rows ``dst`` (stream batch after the first chunk, §2.6 step 4)."""
        dst = list(dst)
        if not dst:
            return
        idx = torch.as_tensor(dst, dtype=torch.long, device=self.device)
        tensors = [self.k, self.v, self.queue, self.q_head, self.q_len, *self._scaled(), *self._positions()]
        tensors += [t for t in (self.cross_k, self.cross_v) if t is not None]
        for t in tensors:
            # repeat (a copy): with one layer, a contiguous() view of the source row would alias the destination
            t.index_copy_(1, idx, t[:, src:src + 1].repeat(1, len(dst), *[1] * (t.dim() - 2)))
        for r in dst:
            self.global_end[r], self.local_end[r] = self.global_end[src], self.local_end[src]
            self.rolling[r] = list(self.rolling[src])
        if self.memory is not None:
            self.memory.copy_rows(src, dst)

    def expand_batch(self, batch_size: int) -> None:
        """Row 0 into rows 1..batch_size-1, growing the pool if it has fewer rows (a single-stream cache)."""
        if batch_size > self.num_rows:
            if self.memory is not None:
                raise ValueError("a KV cache with a memory bank (memory_frames > 0) holds its rows as made; "
                                 "it runs in mode=single_wo, one row per stream")
            old = (self.k, self.v, self.queue, self.q_head, self.q_len, self.cross_k, self.cross_v,
                   self.global_end, self.local_end, self.rolling)
            old_scales = self._scaled() + self._positions()
            self._alloc(batch_size)
            r = old[0].shape[1]
            for new, o in zip((self.k, self.v, self.queue, self.q_head, self.q_len, *self._scaled(), *self._positions()),
                              (*old[:5], *old_scales)):
                new[:, :r] = o
            self.global_end[:r], self.local_end[:r], self.rolling[:r] = old[7], old[8], old[9]
            if old[5] is not None:
                self.cross_k = torch.cat([old[5], old[5][:, :1].expand(-1, batch_size - r, -1, -1, -1)], 1)
                self.cross_v = torch.cat([old[6], old[6][:, :1].expand(-1, batch_size - r, -1, -1, -1)], 1)
        self.copy_rows(0, range(1, batch_size))

    def set_cross(self, rows: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one prompt's cross-attention K/V ``[L, H, Ltxt, dh]`` (this pool's layers) into ``rows``, in
        place once allocated (a captured CUDA graph keeps reading the same buffers)."""
        if self.cross_k is None or self.cross_k.shape[2:] != k.shape[1:]:
            shape = (k.shape[0], self.num_rows, *k.shape[1:])
            self.cross_k = torch.zeros(shape, dtype=k.dtype, device=self.device)
            self.cross_v = torch.zeros(shape, dtype=v.dtype, device=self.device)
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        self.cross_k.index_copy_(1, idx, k[:, None].expand(-1, len(idx), -1, -1, -1).contiguous())
        self.cross_v.index_copy_(1, idx, v[:, None].expand(-1, len(idx), -1, -1, -1).contiguous())

    def cross(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's rows of one layer's cross-attention K/V, ``[B, H, Ltxt, dh]`` each."""
        if self.cross_k is None:
            raise RuntimeError("no prompt set on these KV-cache rows: set_prompt first")
        i = self.local(layer)
        return self._rows(self.cross_k[i], plan), self._rows(self.cross_v[i], plan)

    @staticmethod
    def _rows(t: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        if plan.row_range is not None:
            return t[plan.row_range[0]:plan.row_range[1]]
        return t.index_select(0, plan.row_index)

    def queue_contents(self, layer: int, row: int) -> list[int]:
        """The eviction queue of one (layer, row), front first (for tests and debugging; syncs)."""
        i = self.local(layer)
        head, n = int(self.q_head[i, row]), int(self.q_len[i, row])
        cap = self.spec.capacity
        return [int(self.queue[i, row, (head + j) % cap]) for j in range(n)]

    # ------------------------------------------------------------------ layers (a pipe stage hands some over)
    LAYER_STATE = ("k", "v", "k_scale", "v_scale", "queue", "q_head", "q_len", "pos", "cross_k", "cross_v")

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Everything this pool holds for one layer, every row: keys, values, the eviction queues (head, length,
        contents) and the cross-attention K/V. The host mirrors are per row, the same for every layer."""
        i = self.local(layer)
        return {name: getattr(self, name)[i] for name in self.LAYER_STATE if getattr(self, name) is not None}

    def empty_layer_state(self) -> dict[str, torch.Tensor]:
        """Buffers shaped like ``layer_state`` (to receive a layer into)."""
        return {name: torch.empty_like(getattr(self, name)[0]) for name in self.LAYER_STATE
                if getattr(self, name) is not None}

    def set_layers(self, first: int, end: int, incoming: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> None:
        """Serve layers [first, end) from now on: layers kept are copied over, layers new to this pool come from
        ``incoming`` ({layer: layer_state}), layers outside the range are dropped. Rows and mirrors are unchanged."""
        incoming = incoming or {}
        if not 0 <= first < end <= self.spec.num_layers:
            raise ValueError(f"layer range [{first}, {end}) outside [0, {self.spec.num_layers})")
        missing = [l for l in range(first, end) if not self.first_layer <= l < self.end_layer and l not in incoming]
        if missing:
            raise ValueError(f"set_layers({first}, {end}): layers {missing} are neither held nor handed over")
        for name in self.LAYER_STATE:
            old = getattr(self, name)
            if old is None:
                continue
            parts = [old[l - self.first_layer] if self.first_layer <= l < self.end_layer else incoming[l][name]
                     for l in range(first, end)]
            setattr(self, name, torch.stack(parts))
        self.first_layer, self.end_layer = first, end

    # ------------------------------------------------------------------ per-call protocol
    def plan(self, starts: Sequence[int], num_tokens: int, rows: Optional[Sequence[int]] = None,
             pop: Optional[Sequence[bool]] = None, static: bool = False, context: bool = False) -> StepPlan:
        """Decide, on the host, what this call does to each row. ``starts``: virtual start token per row;
        ``rows``: pool rows (default 0..B-1); ``pop``: whether an evicting row rotates its ring (default yes);
        ``static`` (for CUDA graphs): while the cache fills, attend over the whole cache with per-row lengths
        masking what is not written yet (one shape for every call), and keep the plan's device facts in one
        buffer per row set, rewritten by each call: a graph captured on one call reads the next call's plan
        there (an earlier static plan of the same rows sees the new values). ``context``: the call is a block's
        context pass (its clean keys; the memory bank records from those)."""
        spec, m = self.spec, num_tokens
        rows = list(range(len(starts))) if rows is None else [int(r) for r in rows]
        pop = [True] * len(rows) if pop is None else [bool(p) for p in pop]
        if not (len(starts) == len(rows) == len(pop)):
            raise ValueError(f"{len(starts)} starts, {len(rows)} rows and {len(pop)} pop flags for one call")
        if not rows or max(rows) >= self.num_rows or min(rows) < 0 or len(set(rows)) != len(rows):
            raise ValueError(f"rows {rows} are not distinct rows of a {self.num_rows}-row KV cache")
        if m > spec.size:
            raise ValueError(f"chunk of {m} tokens ({m // spec.frame_tokens} latent frames) is longer than the "
                             f"KV cache ({spec.num_frames} frames = {spec.size} tokens)")
        evict, new_local, append_start, register, new_rolling = [], [], [], [], []
        for r, c in zip(rows, starts):
            d = decide(spec, self.global_end[r], self.local_end[r], self.rolling[r], int(c), m, where=f"row {r}")
            evict.append(d.evict)
            new_local.append(d.local_end)
            append_start.append(d.append_start)
            register.append(d.register or 0)
            new_rolling.append(d.register)
        max_len = spec.size if static else max(new_local)
        frames = [int(c) // spec.frame_tokens for c in starts]
        pops = [int(e and p) for e, p in zip(evict, pop)]
        # One small host->device copy per call, from pinned memory so it does not block the host.
        fresh = [int(int(c) + m > self.global_end[r]) for r, c in zip(rows, starts)]
        packed = torch.tensor([rows, frames, append_start, register, [int(x) for x in evict], pops, new_local, fresh],
                              dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        out = self._static_plans.get(tuple(rows)) if static else None
        if out is None:
            out = torch.empty(packed.shape, dtype=torch.long, device=self.device)
            if static:
                self._static_plans[tuple(rows)] = out
        out.copy_(packed, non_blocking=True)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        memory = None if self.memory is None else self.memory.plan(rows, context, new_local, max_len)
        return StepPlan(rows=rows, num_tokens=m, starts=[int(c) for c in starts], evict=evict, new_local_end=new_local,
                        max_len=max_len, row_range=(rows[0], rows[0] + len(rows)) if consecutive else None,
                        kv_lens=out[6] if any(x != max_len for x in new_local) else None,
                        refresh_check=spec.sink_frames > 0 and spec.refresh_threshold > -1 and m <= spec.frame_tokens,
                        row_index=out[0], start_frames=out[1], append_start=out[2], register_val=out[3],
                        evict_flag=out[4], pop_flag=out[5], fresh_flag=out[7], new_rolling=new_rolling,
                        memory=memory)

    def update(self, layer: int, plan: StepPlan, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write this layer's new (post-RoPE) keys and values; return the keys/values to attend over.

        k_new, v_new: [B, m, H, dh]. Returns (k [B, Lmax, H, dh], v [B, Lmax, H, dh], kv_lens or None,
        key_bias [B, Lmax] float32 or None): with ``spec.key_bias`` < 1, added to every query's scores of those keys.
        """
        spec, m = self.spec, plan.num_tokens
        li = self.local(layer)
        rows = plan.row_index
        cap = spec.capacity
        buf = self.queue[li]
        head, length = self.q_head[li].index_select(0, rows), self.q_len[li].index_select(0, rows)

        if plan.refresh_check:  # adaptive sink refresh (§1.7 step 1), all rows at once
            sinks, s = spec.sink_frames, spec.frame_tokens
            k_sink = self._read(li, plan, "k", sinks * s)
            v_sink = self._read(li, plan, "v", sinks * s)
            sim = sink_similarity(k_sink, v_sink, k_new, v_new, sinks)
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
        self.q_head[li].index_copy_(0, rows, head)
        self.q_len[li].index_copy_(0, rows, length)

        # One scatter for all rows: row r's m tokens go to [start_r, start_r + m).
        # (the clamp only matters for chunks longer than a frame -- target_fps growth -- whose window would
        # start before the cache at a slot registered for one-frame chunks; the reference slices out of range)
        start = torch.where(plan.evict_mask, (target - m).clamp(0, spec.size - m), plan.append_start)
        flat = (rows[:, None] * spec.size + start[:, None] + torch.arange(m, device=self.device)[None, :]).reshape(-1)
        if spec.sink_ema:
            self._fold_into_sink(li, plan, rows, start, flat)
        for name, new in (("k", k_new), ("v", v_new)):
            new = new.reshape(-1, *new.shape[2:])
            store, scale = getattr(self, name)[li].view(-1, *new.shape[1:]), getattr(self, f"{name}_scale")
            if scale is None:
                store.index_copy_(0, flat, new.to(self.dtype))
            else:   # quantised with the token's own scales (written beside it: sinks and evictions move both)
                q, s = quantize_kv(new, self.kv_dtype)
                store.index_copy_(0, flat, q)
                scale[li].view(-1, new.shape[1]).index_copy_(0, flat, s)
        bias = self._key_bias(start, m, plan.max_len) if spec.key_bias < 1 else None
        k, v = self._read(li, plan, "k", plan.max_len), self._read(li, plan, "v", plan.max_len)
        if plan.memory is None:
            return k, v, plan.kv_lens, bias
        # MemFlow: the bank's frames beside the window (read first: this call's record is seen from the next block)
        k, v, kv_lens = self.memory.attended(li, plan.memory, k, v, plan.kv_lens)
        # the prompt's text keys only where a full bank scores its frames (a recording call, once full)
        scores = any(plan.memory.full) and self.cross_k is not None
        self.memory.record(li, plan.memory, k_new, v_new, self._rows(self.cross_k[li], plan) if scores else None)
        return k, v, kv_lens, bias

    def _key_bias(self, start: torch.Tensor, m: int, length: int) -> torch.Tensor:
        """Krea's KV attention bias over the keys read [B, length]: log(b) on the cache's past frames, 0 on its
        first frame (slot 0: the anchor; with Krea's per-chunk rebuild the oldest kept frame) and on the tokens this
        call wrote ([start, start + m) of each row); on the device, from the call's write positions."""
        j = torch.arange(length, device=self.device)[None, :]
        own = (j >= start[:, None]) & (j < start[:, None] + m)
        past = (j >= self.spec.frame_tokens) & ~own
        return torch.where(past, math.log(self.spec.key_bias), 0.0).to(torch.float32)

    def _fold_into_sink(self, li: int, plan: StepPlan, rows: torch.Tensor, start: torch.Tensor,
                        flat: torch.Tensor) -> None:
        """Reward Forcing's EMA sink, before a call writes its tokens: where a row's write evicts an older chunk,
        that chunk's frame j is folded into sink frame j (``sink = a * sink + (1 - a) * evicted``), its keys first
        moved in time to the sink frame's position (keys are stored after RoPE; values have no position). The
        chunk must have the sink's size, as in Reward Forcing's loop (blocks of 3 frames, a 3-frame sink). Then
        the positions of the slots written are recorded."""
        spec, m, a = self.spec, plan.num_tokens, self.spec.sink_ema
        S, sinks = spec.frame_tokens, spec.sink_frames
        f = m // S
        slots = start[:, None] // S + torch.arange(f, device=self.device)[None, :]     # [B, f] physical frames
        pos = self.pos[li]
        new_pos = plan.start_frames[:, None] + torch.arange(f, device=self.device)[None, :]
        if m != spec.sink_tokens and any(plan.evict):
            raise ValueError(f"an EMA sink folds an evicted chunk into the sink frame by frame: chunks of {f} latent "
                             f"frames need a sink of {f} frames, the cache has {sinks}")
        if m == spec.sink_tokens:   # every call of the sink's size, evicting or not: a CUDA graph holds one code path
            old_pos = pos[rows[:, None], slots]                                           # [B, f]
            fold = plan.evict_mask & (plan.fresh_flag != 0)   # another pass over its own chunk evicts nothing
            sink_flat = (rows[:, None] * spec.size + torch.arange(spec.sink_tokens, device=self.device)).reshape(-1)
            sink_pos = pos[rows, :sinks]                                                  # [B, sinks]
            b = rows.shape[0]
            for name in ("k", "v"):
                store = getattr(self, name)[li].view(-1, spec.num_heads, spec.head_dim)
                evicted = store.index_select(0, flat).view(b, m, spec.num_heads, spec.head_dim)
                if name == "k":
                    evicted = self.move_keys(evicted, sink_pos - old_pos)
                sink = store.index_select(0, sink_flat).view(b, spec.sink_tokens, spec.num_heads, spec.head_dim)
                folded = (a * sink.float() + (1 - a) * evicted.float()).to(store.dtype)
                store.index_copy_(0, sink_flat, torch.where(fold[:, None, None, None], folded, sink).flatten(0, 1))
        pos[rows[:, None], slots] = new_pos

    def commit(self, plan: StepPlan) -> None:
        """Advance the host mirrors after all layers ran this plan."""
        for r, c, local, new in zip(plan.rows, plan.starts, plan.new_local_end, plan.new_rolling):
            self.global_end[r] = c + plan.num_tokens
            self.local_end[r] = local
            if new is not None:
                self.rolling[r].append(new)
        if plan.memory is not None:
            self.memory.commit(plan.memory)
