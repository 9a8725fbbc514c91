"""A stand-in text encoder for runs without UMT5 weights: a prompt-seeded random embedding.

Same prompt -> same embedding (so prompt changes and caching behave as with the real encoder), different
prompts -> different ones. It carries no meaning: anything produced with it is flagged as dummy.
"""
from __future__ import annotations

import hashlib

import torch


class HashedTextEncoder:
    weights_are_dummy = True

    def __init__(self, dim: int = 4096, text_len: int = 512, tokens: int = 16):
        self.dim, self.text_len, self.tokens = dim, text_len, tokens

    def encode(self, prompt: str | list[str]) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError("the prompt is empty")
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            out[i, : self.tokens] = torch.randn(self.tokens, self.dim, generator=g) * 0.1  # padding rows stay 0
        return out
