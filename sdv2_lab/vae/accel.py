"""Optional acceleration of a VAE's steady-state steps: ``torch.compile`` or CUDA-graph replay.

A VAE exposes ``_steps``: name -> ``fn(x, cache)``, pure functions of an input tensor and a ``state.Batch`` of
stream caches whose history tensors are updated in place and never re-allocated after each stream's first
call. That is what makes both modes possible:

* ``compile``: ``torch.compile(fn, dynamic=False)``; chunks have fixed shapes, so it compiles once per shape.
* ``cuda_graph``: one graph per (batch of streams, input shape), the batch named by its streams' cache ids.
  A key's first call runs eager (it makes any missing history, JIT-compiles kernels, autotunes cuDNN for the
  batch size and advances the streams as usual); the second captures the graph and replays it; later calls
  only replay. The output is cloned out of the graph's memory. A step keeps its ``max_graphs`` most recent
  graphs; ``forget`` drops those of streams that ended (``vae.release``).

Memory and concurrency (the stream engine encodes chunk k+1 while it decodes chunk k-1): the graphs of one
step share one memory pool (they never run at the same time: one call of a step at a time, its output
copied out before the next), so a new batch of streams costs a capture, not another workspace; different
steps have their own pools and capture streams and may replay at the same time on different CUDA streams.
A replay (and the copies around it) runs on the caller's current CUDA stream; capture works from any
current stream. Calls on ONE stream must not overlap (they advance its state): the streaming order
guarantees that.

Either mode falls back to eager (for good, with a logged reason) when it cannot run: CUDA graphs on a
non-CUDA device, or any exception while compiling / capturing.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..cuda_streams import named_stream
from ..graph_cache import Captured, CountsGraphs, GraphCache

log = logging.getLogger(__name__)

MODES = ("none", "compile", "cuda_graph")


class _Accelerated:
    """Wraps one step; ``fallback_reason`` is set once it has given up and runs eager."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.fallback_reason: str | None = None
        self.accelerated_calls = 0

    def _give_up(self, reason: str) -> None:
        self.fallback_reason = reason
        log.warning("VAE %s step: %s; running eager", self.name, reason)

    def __call__(self, x: torch.Tensor, cache) -> torch.Tensor:
        if self.fallback_reason is not None:
            return self.fn(x, cache)
        try:
            out, fast = self._run(x, cache)
        except Exception as exc:  # noqa: BLE001 -- any failure of the fast path means: use the slow one
            self._give_up(f"{type(self).__name__} failed ({type(exc).__name__}: {exc})")
            return self.fn(x, cache)
        self.accelerated_calls += fast
        return out

    def _run(self, x, cache) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError


class Compiled(_Accelerated):
    def __init__(self, fn: Callable, name: str, backend: str = "inductor", mode: str | None = None):
        super().__init__(fn, name)
        self.compiled = torch.compile(fn, dynamic=False, backend=backend, mode=mode)

    def _run(self, x, cache):
        return self.compiled(x, cache), True


class _Graph:
    """The graph of one (batch of streams, input) key: its static input and its captured step."""

    def __init__(self, static_in: torch.Tensor, captured: Captured):
        self.static_in, self.captured = static_in, captured


class CUDAGraphed(CountsGraphs, _Accelerated):
    """``emulate`` (CPU tests): the graph bookkeeping and replays run, each replay as a call again."""

    def __init__(self, fn: Callable, name: str, max_graphs: int = 8, emulate: bool = False):
        super().__init__(fn, name)
        self.emulate = emulate
        self.graphs: GraphCache[_Graph] = GraphCache(max_graphs)   # (stream ids, shape, dtype, device) -> _Graph
        self.pool = self.stream = None
        self.pools_made = 0

    def _run(self, x, cache):
        if x.device.type != "cuda" and not self.emulate:
            raise RuntimeError(f"CUDA graphs need a CUDA device, the input is on {x.device}")
        key = (cache.key, tuple(x.shape), x.dtype, x.device)  # any strides: static_in.copy_(x) takes them
        g = self.graphs.get(key, lambda: self._capture(x, cache))
        if g is None:  # first call with this key: eager (any missing history is made, cuDNN tuned)
            return self.fn(x, cache), False
        g.static_in.copy_(x)
        return g.captured.replay().clone(), True  # on the caller's current stream; out of the graph's memory

    def forget(self, uids) -> None:
        """Drop the graphs of batches that include any of these streams (they have ended)."""
        uids = set(uids)
        self.graphs.forget(lambda key: bool(set(key[0]) & uids))

    def _capture(self, x, cache) -> _Graph:
        """Record the step (nothing runs: the streams are not advanced by capturing) into the step's memory
        pool, on the step's own capture stream, after the caller's pending work."""
        if not self.graphs.graphs:
            # a fresh pool whenever no graph holds one: the allocator frees a private pool with its last graph,
            # and capturing into the freed pool's handle fails (an internal assert, and a generator left mid-capture)
            self.pool = object() if self.emulate else torch.cuda.graph_pool_handle()
            self.pools_made += 1
        if self.stream is None and not self.emulate:
            self.stream = named_stream(x.device, f"vae-capture:{self.name}")
        static_in = torch.empty_like(x)  # filled by every replay
        g = _Graph(static_in, Captured(lambda: self.fn(static_in, cache), self.emulate, error_mode="thread_local",
                                       pool=None if self.emulate else self.pool, stream=self.stream))
        if not self.emulate:
            log.info("VAE %s step: captured a CUDA graph for %d stream(s), input %s", self.name, len(cache.key),
                     tuple(x.shape))
        return g


def accelerate_vae(vae, mode: str = "none", backend: str = "inductor", compile_mode: str | None = None):
    """Wrap ``vae._steps`` in place for ``mode`` (``auto`` | ``none`` | ``compile`` | ``cuda_graph``; auto =
    cuda_graph on CUDA, none elsewhere); returns ``vae``."""
    if mode in (None, "none", False):
        return vae
    if mode != "auto" and mode not in MODES:
        raise ValueError(f"unknown accelerate mode {mode!r}; valid: {['auto', *MODES]}")
    device = next(vae.parameters()).device
    if mode == "auto":
        mode = "cuda_graph" if device.type == "cuda" else "none"
        if mode == "none":
            log.info("VAE accelerate=auto on %s: the VAE runs eager (graphs need a CUDA device)", device)
            return vae
    if mode == "cuda_graph" and device.type != "cuda":
        log.info("VAE accelerate=cuda_graph needs a CUDA device; on %s the VAE runs eager", device)
        return vae
    for name, fn in list(vae._steps.items()):
        if mode == "compile":
            try:
                vae._steps[name] = Compiled(fn, name, backend=backend, mode=compile_mode)
            except Exception as exc:  # noqa: BLE001
                log.warning("VAE %s step: torch.compile unavailable (%s: %s); running eager", name,
                            type(exc).__name__, exc)
        else:
            vae._steps[name] = CUDAGraphed(fn, name)
    return vae
