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

``kv_recompute_reencode`` (Krea, Scope's ``get_context_frames``): the rebuilt context's oldest frame is not the
latent as it left the DiT but the last decoded video frame of that latent encoded alone, as a stream's first
frame is (an image latent: the kind of latent the model saw first in every training clip), once the stream's own
first latent has left the context. So the stream keeps each latent's last decoded frame too (``add_decoded``).

``kv_recache_global_sink`` (LongLive's ``global_sink``): the sink's keys and values from before the switch are put
back once its blocks are replayed, so the later frames attend to the sink as the old prompt wrote it (LongLive's
recompute never writes the sink region). All-steps modes only
(``single-wo``): in a stream batch each row holds its own step's noisy history, which clean frames cannot stand in for.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..units import FRAMES_PER_LATENT


def replay_blocks(frames: int, frames_per_block: int) -> list[int]:
    """Latent frames of each replay call: blocks of the chunk size from the front, the last one shorter."""
    return [min(frames_per_block, frames - i) for i in range(0, frames, frames_per_block)]


@dataclass
class CleanFrames:
    """One stream's finished latents, kept for a rebuild: its first ``head`` frames (the sink) and the latest
    ``keep`` frames after them. Tensors are the x0 views the DiT returned ([1, F, C, h, w] per chunk). With
    ``pixels``, also the last decoded frame of each of the latest ``keep`` latents (what Krea re-encodes)."""
    head: int
    keep: int
    pixels: bool = False
    head_parts: list = field(default_factory=list)
    recent: deque = field(default_factory=deque)
    head_len: int = 0
    recent_len: int = 0
    added: int = 0                                   # latent frames added: the stream's index of the next one
    decoded: int = 0                                 # latent frames whose video frames came back
    last_frames: dict = field(default_factory=dict)  # latent index -> its last video frame [3, H, W] in [-1, 1]
    last_frames_ready: object = None                 # an event after the newest of them (None: no wait needed)

    def add(self, x0: torch.Tensor) -> None:
        self.added += x0.shape[1]
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

    def add_decoded(self, video: torch.Tensor, latents: int) -> None:
        """The video frames [T, 3, H, W] in [-1, 1] that ``latents`` latent frames decoded to: each latent's last
        frame is kept (copied: the caller's frames go on to the user), the latest ``keep`` of them."""
        if not self.pixels:
            return
        last = [video.shape[0] - 1 - FRAMES_PER_LATENT * (latents - 1 - i) for i in range(latents)]
        frames = video[last]   # advanced indexing: a copy
        for i in range(latents):
            self.last_frames[self.decoded + i] = frames[i]
        self.decoded += latents
        for index in [i for i in self.last_frames if i < self.decoded - self.keep]:
            del self.last_frames[index]

    def first_index(self, frames: int) -> int:
        """The stream's index of the first latent frame that ``latest(frames)`` returns."""
        return 0 if self.head_len else self.added - min(frames, self.recent_len)

    def latest(self, frames: int) -> Optional[torch.Tensor]:
        """The head frames, then the latest ``frames - head`` frames: [1, K, C, h, w], or None when none is kept."""
        parts = list(self.head_parts)
        tail = frames - self.head_len
        if tail > 0 and self.recent:
            parts.append(torch.cat(list(self.recent), dim=1)[:, -tail:])
        return torch.cat(parts, dim=1) if parts else None
