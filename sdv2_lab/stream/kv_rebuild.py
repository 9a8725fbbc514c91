"""Rebuilding a stream's KV cache from its own finished latents: one mechanic, two triggers.

* ``kv_recache`` (LongLive, NVlabs/LongLive ``_recache_after_switch``): on a prompt switch, the stream's cache is
  written again from its latest clean latents under the *new* prompt, so the frames that follow attend to a
  history that agrees with the prompt they are made for (without it, the old prompt's keys linger for a window).
* ``kv_recompute_frames`` (Krea Realtime, ``do_kv_recomp``): before every chunk after the first, the cache is
  written again from the last few clean latent frames, so each block sees a fresh, consistent context instead of
  keys computed while earlier blocks were noisy.

Either way the stream's rows are reset and the kept frames replayed at t = 0 in blocks of the stream's chunk size
from position 0, each block attending to the blocks before it (what those models' block-causal mask over the
frames does in one call). The stream's positions restart there: its next chunk follows the replayed frames. RoPE
is relative, so moving the frames to small positions changes nothing they attend to. The first ``sink_frames``
latent frames of the stream are kept apart and lead every rebuilt cache (LongLive's global sink).

Differences from those loops, stated: LongLive keeps the sink's old-prompt keys (``global_sink``) where this
replays the sink frames under the new prompt too; Krea re-encodes the oldest context frame from its decoded
pixels as a first-frame latent, where this replays the latent as it left the DiT. All-steps modes only
(``single-wo``): in a stream batch each row holds its own step's noisy history, which clean frames cannot stand in for.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch


def replay_blocks(frames: int, frames_per_block: int) -> list[int]:
    """Latent frames of each replay call: blocks of the chunk size from the front, the last one shorter."""
    return [min(frames_per_block, frames - i) for i in range(0, frames, frames_per_block)]


@dataclass
class CleanFrames:
    """One stream's finished latents, kept for a rebuild: its first ``head`` frames (the sink) and the latest
    ``keep`` frames after them. Tensors are the x0 views the DiT returned ([1, F, C, h, w] per chunk)."""
    head: int
    keep: int
    head_parts: list = field(default_factory=list)
    recent: deque = field(default_factory=deque)
    head_len: int = 0
    recent_len: int = 0

    def add(self, x0: torch.Tensor) -> None:
        if self.head_len < self.head:
            take = min(self.head - self.head_len, x0.shape[1])
            self.head_parts.append(x0[:, :take])
            self.head_len += take
            x0 = x0[:, take:]
        if x0.shape[1] and self.keep:
            self.recent.append(x0)
            self.recent_len += x0.shape[1]
            while self.recent_len - self.recent[0].shape[1] >= self.keep:   # whole parts no longer needed
                self.recent_len -= self.recent.popleft().shape[1]

    def latest(self, frames: int) -> Optional[torch.Tensor]:
        """The head frames, then the latest ``frames - head`` frames: [1, K, C, h, w], or None when none is kept."""
        parts = list(self.head_parts)
        tail = frames - self.head_len
        if tail > 0 and self.recent:
            parts.append(torch.cat(list(self.recent), dim=1)[:, -tail:])
        return torch.cat(parts, dim=1) if parts else None
