"""Executors run the scheduler's DiT jobs. One small interface; each owns the weights and the KV-cache rows.

    executor = build_executor("cuda_graph", dit, cache, schedule)
    executor.set_prompt(rows, embedding)            # a stream's prompt into its rows' cross-attention K/V
    result = executor.run(job, x, t, noise)         # one job: velocity -> x0 and re-noising included

* ``eager``: plain calls.
* ``cuda_graph``: each pass of an all-steps chunk (mode single-wo; every first chunk) is replayed from a graph
  of the DiT call; a stream-batch job is replayed from a CUDA graph that holds the whole step: the DiT,
  velocity -> x0, re-noising and the slot shift. Its inputs and outputs live in static buffers; the re-noised in-flight
  stays in the graph's input buffer, so the next call only writes each stream's new chunk into its row 0. Shapes
  are static (while the cache fills, attention spans the whole cache with the unwritten part masked): one graph
  while the cache fills, one once it is full, each captured after one eager call of its shape. Every per-call
  fact the graph reads is in the plan's one device buffer, rewritten before each replay. ``emulate`` (CPU tests):
  a replay re-runs the captured call with the objects of its capture, so what a real graph would bake in stale
  is stale there too.
* ``pipe`` stages (a contiguous layer range and its part of the cache on each GPU) implement the same
  interface (``sdv2_lab/parallel``).

Job inputs (the driver prepares them from the streams' state):
* stream-batch job (``job.stream_batch``): ``x [R, F, C, h, w]`` the rows' latents (row 0 of each stream: its
  new chunk), ``t [R]`` each slot's timestep, ``noise [R, F, C, h, w]`` for re-noising slot i to t_{i+1} (each
  stream's last row: unused). Result: ``out [S, F, ...]`` each stream's leaving x0, ``next_x [R, ...]`` the
  in-flight latents for the next call (slot i+1 = re-noised x0 of slot i; slot 0 to be overwritten);
* all-steps job: ``x [R, F, ...]`` noisy chunks, ``t [passes, R]`` each pass's timesteps, ``noise
  [passes - 1, R, ...]`` for re-noising between passes. Result: ``out [R, F, ...]`` x0 of the last pass (with
  ``job.context``, a pass at t = 0 over that x0 then writes the KV cache from the clean chunk).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from ..backbones.kv_cache import StreamKVCache
from ..graph_cache import Captured, CountsGraphs, GraphCache
from ..registry import Registry
from .rolling import run_window
from .scheduler import DiTJob
from .schedule import FlowMatchSchedule, stream_batch_step

log = logging.getLogger(__name__)


@dataclass
class DiTResult:
    out: torch.Tensor                          # finished x0: per stream (stream batch) or per row
    next_x: Optional[torch.Tensor] = None      # the stream batch's in-flight latents for the next call


@runtime_checkable
class Executor(Protocol):
    """What the driver asks of an executor (this module's, and a ``pipe`` stage). It owns the weights and the
    KV-cache rows of the streams it serves."""
    dit: Any
    cache: StreamKVCache
    schedule: FlowMatchSchedule

    @property
    def device(self) -> torch.device: ...

    def set_prompt(self, rows: list[int], embedding: Optional[torch.Tensor]) -> None: ...

    def reset_rows(self, rows: list[int], keep_memory: bool = False) -> None: ...

    def sink_kv(self, rows: list[int]) -> list[torch.Tensor]: ...

    def restore_sink_kv(self, rows: list[int], saved: list[torch.Tensor]) -> None: ...

    def copy_rows(self, src: int, dst: list[int]) -> None: ...

    def run(self, job: DiTJob, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor]) -> DiTResult: ...

    def release(self) -> None: ...


class DiTExecutor:
    """Eager execution of DiT jobs on one device (an ``Executor``)."""
    name = "eager"
    warming = False   # the pipeline's warm-up is running (the graph executor captures first chunks only then)

    def __init__(self, dit, cache: StreamKVCache, schedule: Optional[FlowMatchSchedule] = None):
        self.dit, self.cache = dit, cache
        self.schedule = schedule or FlowMatchSchedule()

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # ------------------------------------------------------------------ rows
    @torch.no_grad()
    def set_prompt(self, rows: list[int], embedding: torch.Tensor) -> None:
        self.dit.set_prompt(self.cache, embedding, rows)

    def reset_rows(self, rows: list[int], keep_memory: bool = False) -> None:
        self.cache.reset_rows(rows, keep_memory)

    def sink_kv(self, rows: list[int]) -> list[torch.Tensor]:
        return self.cache.sink_kv(rows)

    def restore_sink_kv(self, rows: list[int], saved: list[torch.Tensor]) -> None:
        self.cache.restore_sink_kv(rows, saved)

    def release(self) -> None:
        """Give back device memory (the KV cache's tensors, graphs and their pools); unusable afterwards."""
        self.cache.release()

    def copy_rows(self, src: int, dst: list[int]) -> None:
        self.cache.copy_rows(src, dst)

    # ------------------------------------------------------------------ jobs
    @torch.no_grad()
    def run(self, job: DiTJob, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor]) -> DiTResult:
        if job.window is not None:   # Rolling Forcing's window (rolling.py)
            return DiTResult(run_window(self, job, x, t))
        if job.stream_batch:
            return self.stream_batch(job, x, t, noise)
        return self.all_steps(job, x, t, noise)

    def all_steps(self, job: DiTJob, x, t, noise) -> DiTResult:
        """``passes`` calls at the same positions; between them x0 is re-noised to the next pass's timestep."""
        f = x.shape[1]
        for k in range(job.passes):
            last = k == job.passes - 1
            v = self._call(job, x, t[k][:, None].expand(-1, f), job.pops[k])
            x0, x = self.schedule.step(v, x, t[k], None if last else noise[k], None if last else t[k + 1])
        if job.context:   # the clean chunk into the KV cache: one pass at t = 0, its output unused
            self._call(job, x0, torch.zeros_like(t[0])[:, None].expand(-1, f), job.pops[job.passes], context=True)
        return DiTResult(x0)

    def stream_batch(self, job: DiTJob, x, t, noise) -> DiTResult:
        v = self._call(job, x, t[:, None].expand(-1, x.shape[1]), job.pops[0])
        return DiTResult(*self.finish_step(job, v, x, t, noise))

    def finish_step(self, job: DiTJob, v, x, t, noise):
        """The sampler's stream-batch step over the job's rows (``schedule.stream_batch_step``)."""
        return stream_batch_step(self.schedule, v, x, t, noise, len(job.rows) // len(job.streams))

    def window_step(self, x, t, plan, steady: bool = False) -> torch.Tensor:
        """One DiT call of Rolling Forcing's window (``rolling.run_window``) for a made plan; the velocity.
        ``steady``: the call's shapes repeat from call to call (a graph executor may replay it)."""
        return self.dit.step(x, t, self.cache, plan)

    def _call(self, job: DiTJob, x, t, pops, plan=None, context: bool = False) -> torch.Tensor:
        """One eager DiT call over the job's rows (with ``plan`` when it is already made); ``context``: the
        chunk's context pass (MemFlow's memory bank records from it)."""
        plan = plan or self.dit.plan(x, self.cache, job.starts, job.rows, pops, context=context)
        v = self.dit.step(x, t, self.cache, plan)
        self.cache.commit(plan)
        return v


class CUDAGraphExecutor(CountsGraphs, DiTExecutor):
    """Steady-state jobs replayed from CUDA graphs (one per row set and shape, a few kept): a stream batch's whole
    step, an all-steps chunk's DiT passes."""
    name = "cuda_graph"
    max_graphs = 6

    def __init__(self, dit, cache: StreamKVCache, schedule: Optional[FlowMatchSchedule] = None,
                 emulate: bool = False):
        super().__init__(dit, cache, schedule)
        self.emulate = emulate
        # room for a graph per row (each stream's first chunk runs on its own first row; the warm-up captures them,
        # so an evicted one would be recaptured inside a user's first chunk), or the cache's own count per row (the
        # rolling window's two), beside the steady graphs
        per_row = getattr(cache, "graphs_per_row", 1)
        self.graphs: GraphCache[_Graph] = GraphCache(max(self.max_graphs, per_row * cache.num_rows + 4))

    def release(self) -> None:
        self.graphs.clear()     # the graphs' static buffers and private memory pools
        super().release()

    def stream_batch(self, job: DiTJob, x, t, noise) -> DiTResult:
        if x.device.type != "cuda" and not self.emulate:
            return super().stream_batch(job, x, t, noise)
        # static plans: while the cache fills, attention spans the whole cache and masks the unwritten part, so
        # the filling calls share one graph and the full cache another; the plan is in the row set's buffer
        plan = self.dit.plan(x, self.cache, job.starts, job.rows, job.pops[0], static=True)
        key = (tuple(job.rows), tuple(x.shape), x.dtype, plan.refresh_check, plan.kv_lens is None)
        g = self.graphs.get(key, lambda: self._capture(job, x, t, noise, plan))
        if g is None:   # the key's first call: eager
            v = self._call(job, x, t[:, None].expand(-1, x.shape[1]), job.pops[0], plan)
            return DiTResult(*self.finish_step(job, v, x, t, noise))
        if x.data_ptr() != g.x.data_ptr():   # the in-flight latents of the last replay are in place
            g.x.copy_(x)
        g.t.copy_(t)
        g.noise.copy_(noise)
        g.graph.replay()
        self.cache.commit(plan)
        return DiTResult(g.out.clone(), g.x)   # out is overwritten by the next replay; the in-flight latents are reused

    # MemFlow's memory-bank plan tensors (backbones/memory.MemoryPlan), made afresh by each call: a replay reads
    # the captured plan's, so they are copied there first; the bank's host facts (frames held, who records) are
    # in the graph's key
    MEMORY_PLAN = ("row_index", "gather", "kv_lens", "record_index", "record_rows", "record_slot", "record_full")

    def _call(self, job: DiTJob, x, t, pops, plan=None, context: bool = False) -> torch.Tensor:
        """One pass of an all-steps job (mode single-wo, the plugin backbones' own loops, and every stream's first
        chunk): the passes replay one graph of the DiT call per row set and shape (every pass of a chunk has its
        shape, the context pass too), so a first chunk after the warm-up replays what the warm-up captured; the
        stream batch's own eager first calls (``plan`` given) run eager. A first chunk captures only during the
        warm-up (``warming``): afterwards it replays or runs eager, so that no user's first chunk pays a capture.
        Returns the velocity (a static buffer, overwritten by the next replay: the caller consumes it first)."""
        if plan is not None or (x.device.type != "cuda" and not self.emulate):
            return super()._call(job, x, t, pops, plan, context)
        plan = self.dit.plan(x, self.cache, job.starts, job.rows, pops, static=True, context=context)
        mem = plan.memory
        bank = None if mem is None else (tuple(mem.held), tuple(mem.record), tuple(mem.full), mem.gather is None)
        key = ("pass", tuple(job.rows), tuple(x.shape), x.dtype, plan.refresh_check, plan.kv_lens is None, bank)
        if job.first and not self.warming:   # a user's first chunk replays what the warm-up captured, or runs eager
            g = self.graphs.captured(key)
        else:
            g = self.graphs.get(key, lambda: self._capture_pass(x, t, plan))
        if g is None:   # the key's first call (or a first chunk the warm-up did not see): eager
            return super()._call(job, x, t, pops, plan, context)
        v = self._replay_pass(g, x, t, mem, g.plan.memory if mem is not None else None, self.MEMORY_PLAN)
        self.cache.commit(plan)
        return v

    # the rolling window's plan tensors that change from call to call (rolling.RollingPlan); a replay reads them
    # from the captured plan's, so they are copied there first
    WINDOW_PLAN = ("row_index", "start_frames", "read_index", "write_index", "anchor_shift")

    def window_step(self, x, t, plan, steady: bool = False) -> torch.Tensor:
        """Rolling Forcing's window call and its leaving block's t = 0 pass, each replayed from a graph in steady
        state (``steady``: the window holds all its blocks and the clean ring is full, so the shapes repeat; the
        warm-up stream captures them). The growing windows, a rebase and the flush run eager."""
        if not steady or plan.rebase is not None or plan.writes_anchor or \
                (x.device.type != "cuda" and not self.emulate):
            return super().window_step(x, t, plan)
        shapes = tuple(None if getattr(plan, k) is None else tuple(getattr(plan, k).shape) for k in self.WINDOW_PLAN)
        key = ("window", tuple(plan.rows), tuple(x.shape), x.dtype, shapes)
        g = self.graphs.get(key, lambda: self._capture_pass(x, t, plan))
        if g is None:
            return super().window_step(x, t, plan)
        return self._replay_pass(g, x, t, plan, g.plan, self.WINDOW_PLAN)

    @staticmethod
    def _replay_pass(g: "_Graph", x, t, fresh, captured, names) -> torch.Tensor:
        """Replay a pass's graph on ``x``, ``t``: first the per-call plan tensors ``names`` of this call's plan
        ``fresh`` copied into the captured plan ``captured`` (which the graph reads). The velocity: ``g.out``."""
        for name in names if fresh is not None else ():
            if getattr(fresh, name) is not None:
                getattr(captured, name).copy_(getattr(fresh, name))
        g.x.copy_(x)
        g.t.copy_(t)
        g.graph.replay()
        return g.out

    def _capture_pass(self, x, t, plan):
        g = _Graph(x=x.clone(), t=t.clone(), noise=None, plan=plan)
        g.out = torch.empty_like(x)

        def call():
            g.out.copy_(self.dit.step(g.x, g.t, self.cache, plan))

        g.graph = Captured(call, self.emulate)
        if not self.emulate:
            log.info("captured a CUDA graph of the DiT pass for rows %s, input %s", plan.rows, tuple(x.shape))
        return g

    def _capture(self, job, x, t, noise, plan):
        g = _Graph(x=x.clone(), t=t.clone(), noise=noise.clone())
        g.out = torch.empty((len(job.streams), *x.shape[1:]), dtype=x.dtype, device=x.device)

        def step():
            v = self.dit.step(g.x, g.t[:, None].expand(-1, x.shape[1]), self.cache, plan)
            out, next_x = self.finish_step(job, v, g.x, g.t, g.noise)
            g.out.copy_(out)
            g.x.copy_(next_x)

        g.graph = Captured(step, self.emulate)
        if not self.emulate:
            log.info("captured a CUDA graph of the DiT step for rows %s, input %s", job.rows, tuple(x.shape))
        return g


@dataclass
class _Graph:
    x: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    out: torch.Tensor = None
    graph: "Captured" = None
    plan: Any = None               # the captured plan: the rolling window and the bank copy each call's tensors in


EXECUTORS: Registry[Callable[..., DiTExecutor]] = Registry("executor")
EXECUTORS.register("eager")(DiTExecutor)
EXECUTORS.register("cuda_graph")(CUDAGraphExecutor)


def build_executor(name: str, dit, cache: StreamKVCache, schedule: Optional[FlowMatchSchedule] = None) -> DiTExecutor:
    return EXECUTORS.get(name)(dit, cache, schedule)
