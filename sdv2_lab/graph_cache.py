"""CUDA graphs, made one way for the DiT step (``stream/executor.py``), a pipe stage's blocks
(``parallel/graphs.py``) and the VAE's steps (``vae/accel.py``).

* ``GraphCache``: graphs keyed by everything their kernels bake in (rows, streams, shapes, the plan's
  structure). A key's first call runs eager (lazy initialisation, JIT compilation, cuDNN autotuning), its second
  is captured, later calls replay; the ``max_graphs`` most recently used are kept.
* ``Captured``: one captured call. On CUDA a CUDA graph (capturing only records: the call happens at the first
  ``replay``). ``emulate=True`` (CPU tests): a replay runs the call again with the objects of its capture, so
  that a key which forgets a fact a real graph bakes in replays stale inputs there too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

import torch

G = TypeVar("G")


class Captured:
    """``replay()`` returns what the call returned (for a graph: its tensors, overwritten by the next replay).
    ``pool`` / ``stream``: a memory pool shared with other graphs that never replay at the same time, and a
    capture stream of their own (the caller's pending work is waited for on it, not by the host)."""

    def __init__(self, fn: Callable, emulate: bool = False, error_mode: str = "global", pool=None,
                 stream: Optional[torch.cuda.Stream] = None):
        self.fn, self.graph, self.out = fn, None, None
        if emulate:
            return
        if stream is None:
            torch.cuda.current_stream().synchronize()
        else:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode=error_mode):
            self.out = fn()
        # a graph replays without its function: keeping it would tie the graph (and its memory pool) to the
        # closure's owner in a reference cycle, freed only by the cyclic collector, not when the owner goes
        self.fn = None

    def replay(self):
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


class GraphCache(Generic[G]):
    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()   # key -> the caller's graph record, least recently used first
        self.seen: set = set()
        self.captures = self.replays = 0

    def get(self, key: Hashable, capture: Callable[[], G]) -> Optional[G]:
        """The graph for ``key`` to replay (counted as a replay), made by ``capture()`` on the key's second call;
        None on its first call: run that one eager."""
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            g = self.graphs[key] = capture()
            self.captures += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self.replays += 1
        return g

    def captured(self, key: Hashable) -> Optional[G]:
        """The graph for ``key`` if one was captured (counted as a replay), else None: nothing is captured or marked,
        so a caller that must not capture now (a user's first chunk) runs eager instead."""
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            self.replays += 1
        return g

    def forget(self, drop: Callable[[Hashable], bool]) -> None:
        """Drop the graphs (and the first-call marks) of the keys ``drop`` names."""
        for key in [k for k in self.graphs if drop(k)]:
            del self.graphs[key]
        self.seen = {k for k in self.seen if not drop(k)}

    def clear(self) -> None:
        """Drop every graph (their static buffers and memory pools go with them)."""
        self.graphs.clear()
        self.seen.clear()


class CountsGraphs:
    """For an owner of a ``graphs: GraphCache``: its capture and replay counts (what tests and benchmarks read)."""
    graphs: GraphCache

    @property
    def captures(self) -> int:
        return self.graphs.captures

    @property
    def replays(self) -> int:
        return self.graphs.replays
