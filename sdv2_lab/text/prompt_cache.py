"""An LRU cache of prompt embeddings, keyed by the cleaned prompt text.

Switching back to an earlier prompt (a live stream toggling styles) then costs no encoder call. Values are
the embedding rows of the real tokens only (``[n_tokens, D]``), so an entry is ~n/512 of a padded one.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class PromptCache:
    def __init__(self, max_size: int = 16):
        if max_size < 0:
            raise ValueError(f"cache size must be >= 0 (0 disables the cache), got {max_size}")
        self.max_size = max_size
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)  # most recently used last; eviction pops from the front
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.max_size == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)
