"""Stream-batch streaming as one plain loop over chunks and slots: for readers and tests, not for the engine.

The engine splits this over the scheduler (``scheduler.py``: which chunk sits in which slot, at which
timestep), the driver (``driver.py``: ``_all_steps``, ``_stream_batch``) and the executors (``executor.py``:
the DiT call, x0, re-noising). Here it is one loop, as Self-Forcing's ``causal_inference.py`` states its
rollout. With ``n`` timesteps:

* chunk 0 (the first chunk) gets all ``n`` steps in turn on slot 0, re-noised between them;
* ``stream_batch`` (modes single, pipe): every later call runs all ``n`` slots at once; slot 0 takes the new
  chunk at t_0, slot i the chunk that entered i calls ago (re-noised to t_i), slot n-1 leaves finished. The
  slots start empty, so the first n-1 calls after chunk 0 finish nothing (the fill latency) and n-1 flush
  calls (noise chunks) push the last real chunks out at the end;
* otherwise (single-wo): every chunk gets all steps in turn, as chunk 0 does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

EMPTY = None   # the chunk id of an empty slot (before the stream batch is full) or of a flush noise chunk


@dataclass
class DiTCall:
    """One call of the model: (chunk id or EMPTY, timestep) per slot, and what left it finished."""
    slots: list[tuple[Optional[int], int]]
    finished: Optional[int] = None      # the chunk id that leaves finished, if any
    x0: Any = None                      # its x0 prediction


def plain_loop(denoise: Callable, timesteps: list[int], renoise: Callable, latent: Callable,
               num_chunks: int, stream_batch: bool = True) -> Iterator[DiTCall]:
    """``denoise(x_t, t, slot) -> x0``; ``renoise(x0, t) -> x_t``; ``latent(k)``: chunk k's noisy latent at
    t_0 (``latent(EMPTY)``: a flush noise chunk). Yields one ``DiTCall`` per model call, in order."""
    n = len(timesteps)
    in_flight: list = []                                 # (chunk id, x_t) in slots 1..n-1, newest first
    for k in range(num_chunks):
        if k == 0 or not stream_batch:              # all steps in turn on one slot
            x = latent(k)
            for i, t in enumerate(timesteps):
                x0 = denoise(x, t, 0)
                if i == n - 1:
                    yield DiTCall([(k, t)], k, x0)
                else:
                    yield DiTCall([(k, t)])
                    x = renoise(x0, timesteps[i + 1])
            if stream_batch:                        # the stream batch starts empty (zeros): the fill latency
                in_flight = [(EMPTY, 0 * latent(EMPTY))] * (n - 1)
            continue
        yield from _stream_batch_call(denoise, timesteps, renoise, [(k, latent(k))] + in_flight, in_flight)
    flush = n - 1 - next((i for i, (c, _) in enumerate(in_flight) if c is not EMPTY), n - 1) if stream_batch else 0
    for _ in range(flush):                          # noise chunks until the newest real chunk has left
        yield from _stream_batch_call(denoise, timesteps, renoise, [(EMPTY, latent(EMPTY))] + in_flight, in_flight)


def _stream_batch_call(denoise, timesteps, renoise, slots, in_flight) -> Iterator[DiTCall]:
    """All slots in one call; slot i's x0 re-noised to t_{i+1} moves to slot i + 1; the last slot leaves."""
    x0s = [denoise(x, t, i) for i, ((_, x), t) in enumerate(zip(slots, timesteps))]
    in_flight[:] = [(c, renoise(x0, t)) for (c, _), x0, t in zip(slots, x0s, timesteps[1:])]
    leaving = slots[-1][0]
    yield DiTCall([(c, t) for (c, _), t in zip(slots, timesteps)], leaving, x0s[-1] if leaving is not EMPTY else None)
