"""What a stream engine runs: one validated configuration, checked before any model is built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..backbones.kv_cache import CacheSpec, RowPositions, check_kv_dtype
from ..units import check_resolution, chunk_frames
from .input_guard import InputGuard
from .kv_rebuild import replay_blocks
from .noise_controller import NoiseControllerConfig
from .scheduler import MODES


@dataclass
class PipelineConfig:
    height: int = 480
    width: int = 832
    mode: str = "single"                      # single (stream batch) | single-wo (all steps per chunk) | pipe
    denoising_steps: list = field(default_factory=lambda: [700, 500])  # one entry per step, no trailing 0
    first_chunk_steps: Optional[list] = None  # a stream's first chunk's own steps (None: ``denoising_steps``)
    timestep_shift: float = 8.0               # the flow-matching grid's shift (schedule.py)
    warp_denoising_step: bool = False         # steps t read as grid indices: t -> timesteps[1000 - t] (floats)
    context_pass: bool = False                # all-steps chunks: one more pass at t = 0 over the finished x0
                                              # writes the KV cache from clean latents (Self-Forcing's recipe)
    kv_recache: bool = False                  # a prompt switch rebuilds the stream's KV cache from its latest clean
                                              # latents under the new prompt (LongLive; kv_rebuild.py)
    kv_recache_global_sink: bool = False      # ... keeping the sink's keys and values from before the switch, which
                                              # the rewritten frames attend to (LongLive's global_sink)
    kv_recompute_frames: int = 0              # > 0: before every later chunk, the KV cache is rebuilt from this many
                                              # latest clean latent frames (Krea's per-block recompute)
    kv_recompute_reencode: bool = False       # the recompute's oldest frame re-encoded alone from its decoded pixels,
                                              # a first-frame (image) latent, as Krea does (kv_rebuild.py)
    first_chunk_latents: Optional[int] = None # latent frames of a stream's first chunk (None: 1 + frames_per_block
                                              # in V2V, 1 in T2V, StreamDiffusionV2's)
    num_kv_cache: int = 6                     # latent frames held in the KV cache
    kv_cache_dtype: str = "model"             # KV storage: model (its dtype) | int8 | fp8 (kv_cache.KV_DTYPES)
    sink_frames: int = 3                      # num_sink_tokens (counts latent frames)
    adapt_sink_threshold: float = 0.2         # -1 disables adaptive sink refresh
    sink_ema: float = 0.0                     # > 0: an EMA sink (Reward Forcing): evicted frames folded into the sink
    kv_attention_bias: float = 1.0            # < 1: Krea's KV attention bias (past cache frames scaled by it in attention)
    memory_frames: int = 0                    # > 0: MemFlow's memory bank: this many past latent frames attended beside
                                              # the window, the least relevant to the prompt replaced (memory.py)
    memory_record_interval: int = 1           # the bank records the first latent frame of every n-th block
    frames_per_block: int = 1                 # latent frames per chunk (num_frame_per_block)
    rolling_window: bool = False              # Rolling Forcing: len(steps) blocks denoised in one call, each at its
                                              # own level, on one KV row of anchor + clean frames (rolling.py)
    noise: NoiseControllerConfig = field(default_factory=NoiseControllerConfig)
    t2v: bool = False                         # text-to-video: pure noise in, no input video
    position_refresh_frames: int = 50         # rebase positions at this latent frame (t_refresh; 0 = never)
    target_fps: Optional[float] = None        # grow chunks to (N - sink - 1) latents if slower than this
    reference_rng_order: bool = False         # draw re-noise per stream-batch row, in the reference's order
    cuda_graph: bool = False                  # replay steady-state DiT jobs from CUDA graphs (GPU)
    overlap: bool = False                     # encode / DiT / decode on their own CUDA streams (GPU)
    max_streams: int = 1                      # streams served at once (each: its own KV rows, prompt, state)
    rope_positions: int = 1024                # temporal RoPE positions of the backbone (its rope_max_positions)
    input_guard: str = "raise"                # non-finite / out-of-range frames: raise | clamp | off (input_guard.py)
    input_limit: float = 1.5                  # |x| above this is out of range

    def validate(self) -> "PipelineConfig":
        """Every setting checked, with what was expected; a dry run of the KV-cache positions over more chunks
        than the cache holds, so a combination that would fail mid-stream fails here instead."""
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {sorted(MODES)}")
        check_resolution(self.height, self.width)
        for what, steps in (("denoising steps", self.denoising_steps), ("first_chunk_steps", self.first_chunk_steps)):
            if steps is None:
                continue
            steps = list(steps)
            # the stream batch's rows are the reference's --step (1 to 4); the rolling window has no such limit
            if not 1 <= len(steps) <= (len(steps) if self.rolling_window else 4):
                raise ValueError(f"1 to 4 {what} are supported, got {steps}")
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= 1000 for t in steps) \
                    or steps != sorted(steps, reverse=True):
                raise ValueError(f"{what} must be decreasing integers in (0, 1000], got {steps}")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        if self.context_pass and self.mode == "pipe":
            raise ValueError("context_pass (a clean pass after each chunk's steps) runs in mode=single-wo or single "
                             "(there on first chunks: the stream batch keeps each step's own history), not mode=pipe")
        rebuild = self._check_kv_rebuild()
        if not isinstance(self.frames_per_block, int) or self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be a positive integer, got {self.frames_per_block!r}")
        if not isinstance(self.sink_frames, int) or self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames!r}")
        fl = self.first_chunk_latents
        if fl is not None and (isinstance(fl, bool) or not isinstance(fl, int) or fl < 1):
            raise ValueError(f"first_chunk_latents must be a positive integer or null, got {fl!r}")
        first = self.first_latent_frames
        if not isinstance(self.num_kv_cache, int) or self.num_kv_cache <= max(self.sink_frames, first):
            raise ValueError(f"num_kv_cache={self.num_kv_cache!r} must exceed sink_frames={self.sink_frames} and the "
                             f"first chunk's {first} latent frames")
        check_kv_dtype(self.kv_cache_dtype)
        if self.sink_ema:
            self._check_ema_sink()
        if isinstance(self.kv_attention_bias, bool) or not isinstance(self.kv_attention_bias, (int, float)) \
                or not 0 < self.kv_attention_bias <= 1:
            raise ValueError(f"kv_attention_bias must be in (0, 1] (1 = off; Krea's recipe: 0.3), got "
                             f"{self.kv_attention_bias!r}")
        self._check_memory()
        if not -1 <= self.adapt_sink_threshold <= 1:
            raise ValueError(f"adapt_sink_threshold must be in [-1, 1] (-1 = off), got {self.adapt_sink_threshold}")
        if not 0 < self.noise.noise_scale <= 1:
            raise ValueError(f"noise_scale must be in (0, 1], got {self.noise.noise_scale}")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"target_fps must be positive or null, got {self.target_fps}")
        if self.target_fps is not None and self.mode == "pipe":
            raise ValueError("target_fps (chunks that grow mid-stream) runs in single mode, not mode=pipe")
        InputGuard(self.input_guard, self.input_limit)   # checks both
        if not isinstance(self.max_streams, int) or self.max_streams < 1:
            raise ValueError(f"max_streams must be a positive integer, got {self.max_streams!r}")
        refresh, grow = self.position_refresh_frames, self.max_frames_per_chunk
        if refresh and not self.num_kv_cache <= refresh <= self.rope_positions - grow:
            raise ValueError(f"position_refresh_frames={refresh} must be 0 (never) or in [num_kv_cache="
                             f"{self.num_kv_cache}, {self.rope_positions - grow}] (the RoPE table holds "
                             f"{self.rope_positions} positions and chunks reach {grow} frames past the refresh point)")
        if rebuild:
            self._check_rebuild_fits()
        if self.rolling_window:
            self._check_rolling_window()
            return self   # its cache is not StreamKVCache's ring: the dry run's positions do not apply
        self._dry_run()
        return self

    def _check_rolling_window(self) -> None:
        """The rolling window's own rules (rolling.py): blocks of one size, the first too; the anchor, the working
        frames and the window within the attention span; one DiT on one GPU; none of the other KV mechanics."""
        n, f = len(self.denoising_steps), self.frames_per_block
        others = {k: v for k, v in (("first_chunk_steps", self.first_chunk_steps), ("sink_frames", self.sink_frames),
                                    ("sink_ema", self.sink_ema), ("kv_recache", self.kv_recache),
                                    ("kv_recompute_frames", self.kv_recompute_frames),
                                    ("target_fps", self.target_fps)) if v}
        if self.kv_attention_bias < 1:
            others["kv_attention_bias"] = self.kv_attention_bias
        if self.adapt_sink_threshold > -1:
            others["adapt_sink_threshold"] = self.adapt_sink_threshold
        if self.kv_cache_dtype != "model":
            others["kv_cache_dtype"] = self.kv_cache_dtype
        if self.mode == "pipe" or others:
            raise ValueError(f"rolling_window=true (Rolling Forcing) runs in mode=single or single_wo (one KV row per "
                             f"stream either way) without other KV mechanics; got mode={self.mode}"
                             + "".join(f", {k}={v}" for k, v in others.items()))
        if self.first_latent_frames != f:
            raise ValueError(f"rolling_window=true: every block has frames_per_block={f} latent frames, the first too "
                             f"(first_chunk_latents={self.first_chunk_latents})")
        if self.num_kv_cache < n * f + 2 * f:
            raise ValueError(f"rolling_window=true: num_kv_cache={self.num_kv_cache} (the attention span) must hold the "
                             f"anchor, a window of {n} blocks of {f} latent frames and one block of clean frames "
                             f"(>= {n * f + 2 * f})")
        refresh = self.position_refresh_frames
        if refresh and not self.num_kv_cache < refresh <= self.rope_positions - n * f:
            raise ValueError(f"rolling_window=true: position_refresh_frames={refresh} must be 0 (never) or in "
                             f"({self.num_kv_cache}, {self.rope_positions - n * f}]: a rebase moves the window back to "
                             f"frame num_kv_cache and the window reaches {n * f} frames past it")

    def _check_ema_sink(self) -> None:
        """An EMA sink folds an evicted chunk into the sink frame by frame, as Reward Forcing does (blocks of 3, a
        3-frame sink): chunks of the sink's size, a fixed sink, keys in the model's dtype."""
        grows = self.target_fps is not None
        if not 0 < self.sink_ema < 1 or self.sink_frames != self.frames_per_block or grows \
                or self.adapt_sink_threshold > -1 or self.kv_cache_dtype != "model":
            raise ValueError(f"sink_ema={self.sink_ema} (an EMA sink) needs 0 < sink_ema < 1, sink_frames = "
                             f"frames_per_block (got {self.sink_frames} and {self.frames_per_block}), "
                             f"adapt_sink_threshold=-1 (got {self.adapt_sink_threshold}), "
                             f"kv_cache_dtype=model (got {self.kv_cache_dtype}) and no target_fps (got {self.target_fps})")

    def _check_memory(self) -> None:
        """MemFlow's memory bank (``backbones/memory.py``): it records the clean keys of a block's context pass."""
        m, n = self.memory_frames, self.memory_record_interval
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"memory_frames must be 0 (off) or a positive number of latent frames, got {m!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"memory_record_interval must be a positive number of blocks, got {n!r}")
        if m and not self.context_pass:
            raise ValueError(f"memory_frames={m} (MemFlow's memory bank) records the clean keys of each block's "
                             f"context pass: it needs context_pass=true")
        if m and self.kv_attention_bias < 1:
            raise ValueError(f"memory_frames={m} (MemFlow's memory bank) and kv_attention_bias="
                             f"{self.kv_attention_bias} (Krea's) do not combine: the bias covers the window's keys only")

    @property
    def memory(self) -> int:
        """Frames of the memory bank that runs (0: none). It runs where a stream's one row holds its clean history
        (mode single-wo), as the KV rebuild does; a stream batch has no clean keys to record."""
        return self.memory_frames if self.mode == "single-wo" else 0

    @property
    def forwards_per_latent_frame(self) -> float:
        """DiT forwards each output latent frame takes in steady state (the FLOP model's step count): one per
        timestep (T2V's extra t = 0 included); the context pass at t = 0 in mode single-wo; Rolling Forcing: one
        window call per level, then its leaving block's t = 0 pass; Krea's recompute replays its context frames
        before every block."""
        if self.rolling_window:
            return len(self.denoising_steps) + 1
        n = len(self.step_list)
        if self.mode == "single-wo":
            n += int(self.context_pass)
            if self.kv_rebuild and self.kv_recompute_frames:   # Krea's recompute (the driver's own test)
                n += self.kv_recompute_frames / self.frames_per_block
        return n

    @property
    def attended_frames(self) -> int:
        """Latent frames a steady call attends to: the KV cache's span (the call's own frames and the sink in it)
        and the memory bank's frames beside it."""
        return self.num_kv_cache + self.memory

    @property
    def memory_note(self) -> Optional[str]:
        """One line for the log when the recipe asks for a memory bank that this mode does not run."""
        if not self.memory_frames or self.memory:
            return None
        return (f"memory_frames={self.memory_frames} (MemFlow's memory bank) runs in mode=single_wo; "
                f"mode={self.mode} attends to the KV window only")

    def _check_kv_rebuild(self) -> bool:
        """The rebuild mechanics' own settings (kv_rebuild.py); whether one runs."""
        r = self.kv_recompute_frames
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"kv_recompute_frames must be 0 (off) or a positive number of latent frames, got {r!r}")
        if self.kv_recache and self.kv_recache_global_sink and not (
                self.sink_frames and self.sink_frames % self.frames_per_block == 0
                and self.adapt_sink_threshold <= -1 and not self.sink_ema):
            raise ValueError("kv_recache_global_sink=true keeps the sink's keys through a recache: it needs "
                             f"sink_frames >= 1 and a multiple of "
                             f"frames_per_block (got {self.sink_frames} and {self.frames_per_block}, so the sink is "
                             f"whole replay blocks), a fixed sink: adapt_sink_threshold=-1 (got "
                             f"{self.adapt_sink_threshold}) and sink_ema=0 (got {self.sink_ema})")
        if self.kv_recompute_reencode and not r:
            raise ValueError("kv_recompute_reencode=true re-encodes the oldest frame of the per-chunk KV recompute: "
                             "it needs kv_recompute_frames > 0")
        return self.kv_rebuild is not None

    @property
    def kv_rebuild(self) -> Optional[str]:
        """Which KV rebuild runs ("recache", "recompute", both joined by "+"), or None. It runs where a stream's one
        row holds its clean history (mode single-wo); a stream batch keeps a noisy history per row, which clean
        frames cannot stand in for, so there the cache is kept as it is (``kv_rebuild_note`` says so once)."""
        on = [name for name, v in (("recache", self.kv_recache), ("recompute", self.kv_recompute_frames)) if v]
        return "+".join(on) if on and self.mode == "single-wo" else None

    @property
    def kv_rebuild_note(self) -> Optional[str]:
        """One line for the log when the recipe asks for a KV rebuild that this mode does not run."""
        asked = [k for k, v in (("kv_recache", self.kv_recache), ("kv_recompute_frames", self.kv_recompute_frames)) if v]
        if not asked or self.kv_rebuild is not None:
            return None
        return (f"{' and '.join(asked)} (the recipe's KV rebuild from clean latents) runs in mode=single_wo; "
                f"mode={self.mode} keeps the KV cache as it is")

    def _check_rebuild_fits(self) -> None:
        r = self.kv_recompute_frames   # the context precedes later chunks only (target_fps may grow them)
        grow = max(self.frames_per_block, self.num_kv_cache - self.sink_frames - 1 if self.target_fps else 0)
        if r and not self.sink_frames <= r <= self.num_kv_cache - grow:
            raise ValueError(f"kv_recompute_frames={r} must be in [sink_frames={self.sink_frames}, num_kv_cache - "
                             f"chunk = {self.num_kv_cache - grow}]: the rebuilt context and the next chunk of {grow} "
                             f"latent frames share the {self.num_kv_cache}-frame cache")

    def timesteps(self, steps: list) -> list:
        """Timesteps the model sees for a step list: warped onto the shifted grid (floats) when asked, and the
        final t = 0 pass that StreamDiffusionV2's t2v keeps (without a context pass, which does that job)."""
        if self.warp_denoising_step:   # the one warp, the driver's too (FlowMatchSchedule.warp)
            import torch

            from .schedule import FlowMatchSchedule
            steps = FlowMatchSchedule(self.timestep_shift).warp(torch.tensor(list(steps))).tolist()
        return list(steps) + ([0] if self.t2v and not (self.context_pass or self.rolling_window) else [])

    @property
    def step_list(self) -> list:
        return self.timesteps(list(self.denoising_steps))

    @property
    def first_step_list(self) -> list:
        return self.timesteps(list(self.first_chunk_steps or self.denoising_steps))

    @property
    def first_latent_frames(self) -> int:
        """Latent frames of a stream's first chunk."""
        if self.first_chunk_latents is not None:
            return self.first_chunk_latents
        return 1 if self.t2v else 1 + self.frames_per_block

    @property
    def first_chunk_frames(self) -> int:
        """Input frames of a stream's first chunk (its first frame has a latent frame of its own)."""
        return chunk_frames(self.first_latent_frames - 1, first=True)

    @property
    def chunk_frames(self) -> int:
        """Input frames of every later chunk."""
        return chunk_frames(self.frames_per_block, first=False)

    @property
    def max_frames_per_chunk(self) -> int:
        grown = self.num_kv_cache - self.sink_frames - 1 if self.target_fps else 0
        return max(self.frames_per_block, grown, 1 + self.frames_per_block)

    def _dry_run(self) -> None:
        """Positions and cache decisions of one row over 3 cache lengths of chunks, on the host (S = 1 token)."""
        spec = CacheSpec(num_layers=1, num_heads=1, head_dim=2, frame_tokens=1, num_frames=self.num_kv_cache,
                         sink_frames=self.sink_frames)   # positions only: the sink's kind does not move them
        sizes = [self.first_latent_frames] + [self.frames_per_block] * (3 * self.num_kv_cache)
        if self.target_fps:
            sizes += [max(self.frames_per_block, self.num_kv_cache - self.sink_frames - 1)] * self.num_kv_cache
        row, start = RowPositions(), 0
        rebuild_at = self.num_kv_cache if self.kv_rebuild else -1
        for i, f in enumerate(sizes):
            if i == rebuild_at:   # a rebuild (kv_rebuild.py): the row restarts with the replayed frames
                row, start = RowPositions(), 0
                for b in replay_blocks(self.kv_recompute_frames or self.num_kv_cache, self.frames_per_block):
                    row.advance(spec, start, b, where="dry run (kv rebuild)")
                    start += b
            if f > self.num_kv_cache:
                raise ValueError(f"chunks of {f} latent frames do not fit a KV cache of {self.num_kv_cache} frames")
            row.advance(spec, start, f, where="dry run")
            start += f
            if self.position_refresh_frames and start >= self.position_refresh_frames:
                start = self.num_kv_cache - 1
