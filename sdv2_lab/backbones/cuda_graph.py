"""Replay the steady-state DiT call from a CUDA graph.

Once the KV cache is full every call has the same shapes (all rows evict into a slot chosen on the device,
attention spans the whole cache), so one captured graph serves every later chunk. The host still makes the
plan (pure Python) and copies its few integers into the cache's fixed plan buffer; inputs are copied into
static buffers; the graph is re-captured only if the shapes change. Calls while the cache fills run eagerly.
"""
from __future__ import annotations

import torch

from .kv_cache import StreamKVCache
from .wan_dit import CausalWanDiT


class CUDAGraphStep:
    def __init__(self, model: CausalWanDiT, cache: StreamKVCache):
        self.model, self.cache = model, cache
        self.graph = None
        self.key = None
        self.captures = 0
        self.replays = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, starts) -> torch.Tensor:
        model, cache = self.model, self.cache
        model.check_latent(x, cache)
        _, f, _, hl, wl = x.shape
        plan = cache.plan(starts, f * (hl // model.cfg.patch_size[1]) * (wl // model.cfg.patch_size[2]))
        if not (x.is_cuda and plan.kv_lens is None and all(plan.evict)):
            out = model.step(x, t, cache, plan)
            cache.commit(plan)
            return out
        key = (tuple(x.shape), tuple(t.shape), t.dtype, plan.refresh_check, plan.max_len, cache.cross_k.data_ptr())
        if key != self.key:
            self.static_x, self.static_t = x.clone(), t.clone()
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: the replay below performs this call
                self.static_out = model.step(self.static_x, self.static_t, cache, plan)
            self.key = key
            self.captures += 1
        else:
            self.static_x.copy_(x)
            self.static_t.copy_(t)
        self.graph.replay()
        self.replays += 1
        cache.commit(plan)
        return self.static_out.clone()  # the graph overwrites static_out on the next replay
