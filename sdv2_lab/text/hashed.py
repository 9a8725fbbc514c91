"""A stand-in text encoder for runs without UMT5 weights: a prompt-seeded random embedding.

Same prompt -> same embedding (so prompt changes and caching behave as with the real encoder), different
prompts -> different ones. It carries no meaning: anything produced with it is flagged as dummy.
"""
from __future__ import annotations

import hashlib
import logging

import torch

log = logging.getLogger(__name__)


class HashedTextEncoder:
    """Words stand in for tokens: a prompt longer than ``text_len`` words is truncated to them, with a warning
    (as UMT5 truncates at 512 tokens, about 380 English words)."""
    weights_are_dummy = True

    def __init__(self, dim: int = 4096, text_len: int = 512, tokens: int = 16):
        self.dim, self.text_len, self.tokens = dim, text_len, tokens
        self._warned: set[str] = set()

    def _truncate(self, prompt: str) -> str:
        words = prompt.split()
        if len(words) <= self.text_len:
            return prompt
        if prompt not in self._warned:
            self._warned.add(prompt)
            log.warning("the prompt has %d words, more than the text encoder's %d tokens: truncated to its first %d "
                        "words; the rest is ignored (%.60r...)", len(words), self.text_len, self.text_len, prompt)
        return " ".join(words[: self.text_len])

    def encode(self, prompt: str | list[str]) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError("the prompt is empty")
            seed = int.from_bytes(hashlib.sha256(self._truncate(p).encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            out[i, : self.tokens] = torch.randn(self.tokens, self.dim, generator=g) * 0.1  # padding rows stay 0
        return out
