"""Optional acceleration of a VAE's steady-state steps: ``torch.compile`` or CUDA-graph replay.

A VAE exposes ``_steps``: name -> ``fn(x, cache)``, pure functions of an input tensor and a per-stream cache
whose tensors are updated in place and never re-allocated after the stream's first call of that step with
a given input shape. That is what makes both modes possible:

* ``compile``: ``torch.compile(fn, dynamic=False)``; chunks have fixed shapes, so it compiles once per shape.
* ``cuda_graph``: one graph per (stream cache, step), for one input shape at a time. The step's first call
  with a shape runs eager (it makes the cache's tensors, JIT-compiles kernels, autotunes cuDNN and advances
  the stream as usual); the second captures the graph and replays it; later calls only replay. A new input
  shape drops the graph and starts over. The output is cloned out of the graph's memory.

Concurrency (the stream engine encodes chunk k+1 while it decodes chunk k-1): every (cache, step) has its
own graph memory pool and its own capture stream, so graphs of different steps or different streams'
states never share memory and may replay at the same time on different CUDA streams. A replay (and the
copies around it) runs on the caller's current CUDA stream; capture works from any current stream. Calls
on ONE cache must not overlap (they advance the same state), which the streaming order guarantees.

Either mode falls back to eager (for good, with a logged reason) when it cannot run: CUDA graphs on a
non-CUDA device, or any exception while compiling / capturing.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

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
    """The graph of one (cache, step) for one input key; ``graph`` is None until captured."""

    def __init__(self, key):
        self.key, self.graph, self.static_in, self.static_out = key, None, None, None


class CUDAGraphed(_Accelerated):
    def __init__(self, fn: Callable, name: str):
        super().__init__(fn, name)
        self.captures = 0

    def _run(self, x, cache):
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the input is on {x.device}")
        graphs = cache.__dict__.setdefault("graphs", {})  # graphs live and die with the stream's cache
        key = (tuple(x.shape), x.dtype, x.device)  # any strides: static_in.copy_(x) takes them
        g = graphs.get(self.name)
        if g is None or g.key != key:  # first call with this shape: eager; it makes the cache's tensors
            graphs[self.name] = _Graph(key)
            return self.fn(x, cache), False
        if g.graph is None:
            self._capture(g, x, cache)
        g.static_in.copy_(x)
        g.graph.replay()  # on the caller's current stream
        return g.static_out.clone(), True

    def _capture(self, g: _Graph, x, cache) -> None:
        """Record the step (nothing runs: the cache is not advanced by capturing) into a graph with its own
        memory pool, on the cache's own capture stream, after the caller's pending work."""
        pools = cache.__dict__.setdefault("graph_pools", {})
        if self.name not in pools:
            pools[self.name] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=x.device))
        pool, stream = pools[self.name]
        static_in = torch.empty_like(x)  # filled by every replay
        stream.wait_stream(torch.cuda.current_stream(x.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            static_out = self.fn(static_in, cache)
        g.graph, g.static_in, g.static_out = graph, static_in, static_out
        self.captures += 1
        log.info("VAE %s step: captured a CUDA graph for input %s", self.name, tuple(x.shape))


def accelerate_vae(vae, mode: str = "none", backend: str = "inductor", compile_mode: str | None = None):
    """Wrap ``vae._steps`` in place for ``mode`` (``none`` | ``compile`` | ``cuda_graph``); returns ``vae``."""
    if mode in (None, "none", False):
        return vae
    if mode not in MODES:
        raise ValueError(f"unknown accelerate mode {mode!r}; valid: {list(MODES)}")
    device = next(vae.parameters()).device
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
