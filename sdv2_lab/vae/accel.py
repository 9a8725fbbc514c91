"""Optional acceleration of a VAE's steady-state steps: ``torch.compile`` or CUDA-graph replay.

A VAE exposes ``_steps``: name -> ``fn(x, cache)``, pure functions of an input tensor and a per-stream cache
whose tensors (``cache.tensors()``) are updated in place and never re-allocated after the stream's first
chunk. That is what makes both modes possible:

* ``compile``: ``torch.compile(fn, dynamic=False)``; chunks have fixed shapes, so it compiles once per shape.
* ``cuda_graph``: one graph per (stream cache, input shape), captured after a warm-up whose effect on the
  cache is undone, then replayed with the input copied into a static buffer. The output is cloned out of the
  graph's memory. Graphs of one VAE share a memory pool: replays must be sequential on one CUDA stream.

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
            out = self._run(x, cache)
        except Exception as exc:  # noqa: BLE001 -- any failure of the fast path means: use the slow one
            self._give_up(f"{type(self).__name__} failed ({type(exc).__name__}: {exc})")
            return self.fn(x, cache)
        self.accelerated_calls += 1
        return out

    def _run(self, x, cache):
        raise NotImplementedError


class Compiled(_Accelerated):
    def __init__(self, fn: Callable, name: str, backend: str = "inductor", mode: str | None = None):
        super().__init__(fn, name)
        self.compiled = torch.compile(fn, dynamic=False, backend=backend, mode=mode)

    def _run(self, x, cache):
        return self.compiled(x, cache)


class CUDAGraphed(_Accelerated):
    def __init__(self, fn: Callable, name: str):
        super().__init__(fn, name)
        self.pool = None

    def _run(self, x, cache):
        if x.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the input is on {x.device}")
        graphs = cache.__dict__.setdefault("graphs", {})  # graphs live and die with the stream's cache
        key = (self.name, tuple(x.shape), tuple(x.stride()), x.dtype)
        if key not in graphs:
            graphs[key] = self._capture(x, cache)
        graph, static_in, static_out = graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x, cache):
        saved = {k: t.clone() for k, t in cache.history.items()}
        static_in = x.clone()
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up (cuDNN autotuning, lazy history) off the capture
                for _ in range(2):
                    self.fn(static_in, cache)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.fn(static_in, cache)
        finally:  # undo the warm-up even on failure: the stream has not advanced (new histories start at 0)
            with torch.no_grad():
                for k, t in cache.history.items():
                    t.copy_(saved[k]) if k in saved else t.zero_()
        log.info("VAE %s step: captured a CUDA graph for input %s", self.name, tuple(x.shape))
        return graph, static_in, static_out


def accelerate_vae(vae, mode: str = "none", backend: str = "inductor", compile_mode: str | None = None):
    """Wrap ``vae._steps`` in place for ``mode`` (``none`` | ``compile`` | ``cuda_graph``); returns ``vae``."""
    if mode in (None, "none", False):
        return vae
    if mode not in MODES:
        raise ValueError(f"unknown accelerate mode {mode!r}; valid: {list(MODES)}")
    device = next(vae.parameters()).device
    if mode == "cuda_graph" and device.type != "cuda":
        log.warning("VAE accelerate=cuda_graph needs a CUDA device, the VAE is on %s; running eager", device)
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
