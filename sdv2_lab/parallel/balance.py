"""Which DiT blocks each ``pipe`` stage holds: the first split, and the block scheduler's moves. Pure logic.

A stage's time per job is ``overhead + blocks * per_block``: the first stage also VAE-encodes (and embeds),
the last also runs the head and VAE-decodes, so they hold fewer blocks. ``split`` gives the contiguous ranges
that minimise the slowest stage (greedy: each block goes to the stage it slows least, which is optimal for
costs linear in the block count). ``propose`` is the block scheduler's rule: from measured stage and block
times, move blocks between neighbours (at most ``max_step`` across each boundary per round) toward that
split, only while the slowest stage is more than ``tolerance`` above the mean and a move is predicted to
help. Every rank evaluates it on the same all-gathered numbers, so all agree without a broadcast.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

Ranges = list[tuple[int, int]]


def ranges_of(counts: Sequence[int]) -> Ranges:
    """Blocks per stage -> contiguous [first, end) ranges."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + int(c)))
        start += int(c)
    return out


def counts_of(ranges: Ranges) -> list[int]:
    return [e - s for s, e in ranges]


def check_ranges(ranges: Ranges, num_layers: int) -> Ranges:
    ranges = [(int(s), int(e)) for s, e in ranges]
    ok = ranges and ranges[0][0] == 0 and ranges[-1][1] == num_layers and all(
        s < e for s, e in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not ok:
        raise ValueError(f"block ranges {ranges} do not split the model's {num_layers} blocks into contiguous, "
                         f"non-empty stages in order")
    return ranges


def split(num_layers: int, overhead: Sequence[float], per_block: Sequence[float]) -> Ranges:
    """The split of ``num_layers`` blocks over stages (each >= 1 block) that minimises max_r(overhead[r] +
    blocks[r] * per_block[r])."""
    world = len(overhead)
    if world > num_layers:
        raise ValueError(f"{world} pipeline stages but the model has {num_layers} blocks: each stage needs one")
    counts = [1] * world
    for _ in range(num_layers - world):
        r = min(range(world), key=lambda i: (overhead[i] + (counts[i] + 1) * per_block[i], i))
        counts[r] += 1
    return ranges_of(counts)


def default_split(num_layers: int, world: int, first_extra: float = 0.0, last_extra: float = 0.0) -> Ranges:
    """The first split: equal blocks, the first and last stages charged ``first_extra`` / ``last_extra`` block
    times for their VAE work (and the embedding / head)."""
    overhead = [0.0] * world
    overhead[0] += first_extra
    overhead[-1] += last_extra
    return split(num_layers, overhead, [1.0] * world)


def stage_model(ranges: Ranges, stage_s: Sequence[float], block_s: Sequence[float]):
    """(overhead, per-block time) per stage from measured times per job: the stage's whole busy time and the part
    spent in its blocks. Each stage keeps its own per-block time (a slower device, or one whose link slows its
    kernels, is charged for it)."""
    counts = counts_of(ranges)
    per_block = [b / c for b, c in zip(block_s, counts)]
    overhead = [max(0.0, s - b) for s, b in zip(stage_s, block_s)]
    return overhead, per_block


def imbalance(stage_s: Sequence[float]) -> float:
    """How far the slowest stage is above the mean (0.05 = 5%)."""
    mean = sum(stage_s) / len(stage_s)
    return max(stage_s) / mean - 1 if mean > 0 else 0.0


def propose(ranges: Ranges, stage_s: Sequence[float], block_s: Sequence[float], *, tolerance: float = 0.05,
            max_step: int = 1) -> Optional[Ranges]:
    """New ranges (neighbour moves toward the best split), or None when the stages are within ``tolerance`` of
    the mean or no move is predicted to make the slowest stage faster."""
    if len(ranges) < 2 or not all(math.isfinite(v) and v >= 0 for v in (*stage_s, *block_s)):
        return None
    if imbalance(stage_s) <= tolerance:
        return None
    num_layers = ranges[-1][1]
    overhead, per_block = stage_model(ranges, stage_s, block_s)
    target = split(num_layers, overhead, per_block)
    bounds = [e for _, e in ranges[:-1]]
    goal = [e for _, e in target[:-1]]
    moved = [b + max(-max_step, min(max_step, g - b)) for b, g in zip(bounds, goal)]
    new = ranges_of([e - s for s, e in zip([0] + moved, moved + [num_layers])])

    def predicted(rs):
        return max(o + c * p for o, c, p in zip(overhead, counts_of(rs), per_block))

    if new == ranges or predicted(new) >= predicted(ranges) * (1 - 1e-9):
        return None
    return new
