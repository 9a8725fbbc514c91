"""A deterministic streaming stand-in VAE for engine tests: the Wan VAE's frame/latent arithmetic (4x temporal,
8x spatial, first chunk 1+4k frames -> 1+k latents) and state carried between calls, at almost no cost. It imports
torch only, so that the pipe tests' spawned ranks can import it quickly."""
from __future__ import annotations

import torch
import torch.nn as nn


class PoolVAE(nn.Module):
    """The ``StreamingVAE`` interface (``new_state``, ``encode``, ``decode``) over average pooling and 1x1 mixes."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Parameter(torch.randn(16, 3, generator=g) * 0.5, requires_grad=False)
        self.dec = nn.Parameter(torch.randn(3, 16, generator=g) * 0.3, requires_grad=False)

    def new_state(self, batch_size=1):
        return {"first_encode": True, "first_decode": True, "prev": None}

    def encode(self, state, video):  # [B, 3, T, H, W] -> [B, F, 16, h, w]
        first, state["first_encode"] = state["first_encode"], False
        groups = [(video[:, :, :1], 1), (video[:, :, 1:], 4)] if first else [(video, 4)]
        lat = []
        for g, k in groups:
            if g.shape[2] == 0:
                continue
            b, c, t, h, w = g.shape
            x = g.reshape(b, c, t // k, k, h // 8, 8, w // 8, 8).float().mean(dim=(3, 5, 7))
            lat.append(torch.einsum("oc,bcfhw->bfohw", self.enc.float(), x))
        return torch.cat(lat, dim=1).to(video.dtype)

    def decode(self, state, latents):  # [B, F, 16, h, w] -> [B, T, 3, H, W]
        first, state["first_decode"] = state["first_decode"], False
        x = latents.float()
        if state["prev"] is not None:  # a little temporal memory, like the causal conv caches
            x = x + 0.1 * state["prev"]
        state["prev"] = latents[:, -1:].float()
        px = torch.tanh(torch.einsum("oc,bfchw->bfohw", self.dec.float(), x))
        reps = [1] + [4] * (px.shape[1] - 1) if first else [4] * px.shape[1]
        px = torch.cat([px[:, i:i + 1].expand(-1, r, -1, -1, -1) for i, r in enumerate(reps)], dim=1)
        return px.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4).clamp(-1, 1)
