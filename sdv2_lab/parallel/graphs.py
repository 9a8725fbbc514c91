"""CUDA graphs of a ``pipe`` stage's blocks, one per unit shape: the stage's share of a stream-batch step
replayed instead of launched kernel by kernel.

Eager, a block costs ~3 ms of host time on an H100/H200 (launch-bound: a 1.3B block's GPU work for one row at
480x832 is well under 1 ms), so an eager stage of 15 blocks runs at the host's pace, far below a GPU's.

What a graph holds: RoPE from the plan's start frames, then blocks ``[first, end)`` over one unit's rows (their
attention, KV-cache writes and eviction queues included). Its inputs live in static buffers (the unit's tokens
and modulation are copied in; the plan is the job's static plan, rewritten in place every job by
``StreamKVCache.plan(static=True)``), its output is the graph's own tensor until the next replay. The embedding,
the head, x0 / re-noising and the messages stay eager (a few kernels each).

A graph is keyed by everything its kernels bake in: the blocks, the job's rows (the plan buffer and the
row-range slicing), the slot, the shapes, and the plan's structure (sink refresh on or off, whether the cache
is still filling). A new key runs eagerly once (lazy initialisation, kernel plans), its next call is captured.
Moving blocks (the block scheduler) re-stacks the cache: every graph is dropped and captured again.

``emulate=True`` (CPU tests): "capturing" keeps the call with the objects of its capture and a "replay" runs
exactly that again: a key that forgets a fact the real graph would bake in replays stale inputs there too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..graph_cache import Captured, CountsGraphs, GraphCache

log = logging.getLogger(__name__)


@dataclass
class _UnitGraph:
    tokens: torch.Tensor
    e0: torch.Tensor
    captured: Optional[Captured] = None


class UnitGraphs(CountsGraphs):
    max_graphs = 32   # units per job x (filling, full) x row sets; a few MB of scratch each at 1.3B

    def __init__(self, dit, cache, emulate: bool = False):
        self.dit, self.cache, self.emulate = dit, cache, emulate
        self.graphs: GraphCache[_UnitGraph] = GraphCache(self.max_graphs)

    def clear(self) -> None:
        """Drop every graph (the stage's blocks or its cache tensors changed)."""
        self.graphs.clear()

    def run(self, key: tuple, tokens, e0, plan, f: int, h: int, w: int, first: int, end: int) -> torch.Tensor:
        """Blocks ``[first, end)`` over one unit; the result is valid until the next call (clone to keep it)."""
        key = (first, end, tuple(tokens.shape), tokens.dtype, plan.refresh_check, plan.kv_lens is None, *key)

        def blocks(tok, mod):
            rope = self.dit.rope(plan.start_frames, f, h, w, tok.device)
            return self.dit.run_blocks(tok, mod, rope, self.cache, plan, first, end)

        g = self.graphs.get(key, lambda: self._capture(blocks, tokens, e0))
        if g is None:   # the key's first call: eager
            return blocks(tokens, e0)
        g.tokens.copy_(tokens)
        g.e0.copy_(e0)
        return g.captured.replay()

    def _capture(self, blocks, tokens, e0) -> _UnitGraph:
        g = _UnitGraph(tokens=tokens.clone(), e0=e0.clone())
        # thread_local: the NCCL watchdog and gloo threads query events while this thread captures
        g.captured = Captured(lambda: blocks(g.tokens, g.e0), self.emulate, error_mode="thread_local")
        if not self.emulate:
            log.info("captured a CUDA graph of blocks for a unit of %s", tuple(tokens.shape))
        return g
