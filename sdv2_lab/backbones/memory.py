"""MemFlow's memory bank (KlingTeam/MemFlow, as ported in daydreamlive/scope ``pipelines/memflow``): a few latent
frames of a stream's past kept per layer beside the KV window and attended with it, the least relevant one to
the current prompt replaced when the bank is full.

What it does, from Scope's ``memflow/modules/causal_model.py`` (``CausalWanSelfAttention.forward``,
``CausalWanModel._apply_cache_updates``, ``_apply_cache_updates_before``, ``compress_kv_bank``),
``memflow/blocks`` (``SetupMemoryBankBlock``), ``wan2_1/blocks/clean_kv_cache.py`` and ``memflow/model.yaml``
(``bank_size: 3``, ``record_interval: 3``, ``SMA`` off):

* recording: a block's clean pass at t = 0 (the context pass) records the keys and values of the block's first
  latent frame, post-RoPE at its position, on every ``record_interval``-th block (blocks 0, 3, 6, ...);
* the bank holds ``bank_size`` frames per layer. While it has room the frame goes to the next slot; once full,
  each historical frame is scored against the current prompt's text keys (the cross-attention keys):
  the mean over text tokens, heads and the frame's tokens of ``q_text . k / sqrt(head_dim)``, and the
  ``bank_size - 1`` best are kept with the new frame (here: the worst slot is overwritten, the same set);
* attention: every self-attention call of the stream attends to ``[sink, bank, window]``; a recorded frame is
  seen from the next block on (Scope folds it in at that block's first step), rebuild replays (LongLive's recache
  on a prompt switch) attend to the bank but do not record, and the bank survives them.

Stated differences: Scope folds the staged frame in at the first step of *every* later block, so a block that
records nothing folds the same frame again (once the bank is full it can then hold that frame twice); here each
recorded frame is folded in once, at the end of its context pass, scored against that pass's prompt (Scope scores
against the cross-attention cache of the next block's first step, which a recache has just emptied). Scope only
uses the bank when the cache has a sink; here it is used whatever the sink. Bank keys keep the position they were
written at, as the sink's do, through the engine's position rebase and rebuilds (Scope's positions only grow).

Shapes are static: the bank is ``[L, R, M*S, H, dh]`` with host counts of what each row holds (deterministic in
the stream's blocks, so no device value is read back); the replaced slot is chosen on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def memory_saliency(text_k: torch.Tensor, bank_k: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """Each bank frame's relevance to the prompt [B, M] (Scope's ``compress_kv_bank`` scores): the mean over text
    tokens, heads and the frame's tokens of q_text . k / sqrt(dh). The mean of the dot products equals the dot
    product of the means, so it is computed on the means, in float32.

    text_k: [B, H, Ltxt, dh] (the cache's cross-attention keys); bank_k: [B, M*S, H, dh]."""
    dh = bank_k.shape[-1]
    text = text_k.float().mean(2)                                                        # [B, H, dh]
    frames = bank_k.float().unflatten(1, (-1, frame_tokens)).mean(2)                     # [B, M, H, dh]
    return (frames * text[:, None]).sum(-1).mean(-1) / dh ** 0.5


@dataclass
class MemoryPlan:
    """Host decisions of one call about the bank, plus their device copies."""
    held: list[int]                         # frames each batch row attends to in the bank (before this call)
    record: list[int]                       # batch positions whose row records this call's first frame
    full: list[bool]                        # per recording position: the bank is full (a slot is replaced)
    context: bool                           # the call is a context pass (counted per row at commit)
    rows: list[int]
    row_index: Optional[torch.Tensor] = None      # [B] the call's pool rows
    gather: Optional[torch.Tensor] = None         # [B, Lc + M*S] where rows differ: window, then bank, per row
    kv_lens: Optional[torch.Tensor] = None        # [B] with ``gather``: each row's valid keys
    record_index: Optional[torch.Tensor] = None   # [n] batch positions that record
    record_rows: Optional[torch.Tensor] = None    # [n] their pool rows
    record_slot: Optional[torch.Tensor] = None    # [n] the next free slot (rows with room)
    record_full: Optional[torch.Tensor] = None    # [n] bool


class MemoryBank:
    """The bank of one StreamKVCache's layers and rows."""

    def __init__(self, frames: int, interval: int, frame_tokens: int, layers: int, rows: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.frames, self.interval, self.frame_tokens = frames, interval, frame_tokens
        self.device = device
        shape = (layers, rows, frames * frame_tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.recorded = [0] * rows          # frames recorded per row (the bank holds min(recorded, frames))
        self.contexts = [0] * rows          # context passes per row: which blocks record

    def held(self, row: int) -> int:
        return min(self.recorded[row], self.frames)

    def reset_rows(self, rows: Sequence[int]) -> None:
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        for t in (self.k, self.v):
            t.index_fill_(1, idx, 0)
        for r in rows:
            self.recorded[r] = self.contexts[r] = 0

    def copy_rows(self, src: int, dst: Sequence[int]) -> None:
        idx = torch.as_tensor(list(dst), dtype=torch.long, device=self.device)
        for t in (self.k, self.v):
            t.index_copy_(1, idx, t[:, src:src + 1].repeat(1, len(idx), 1, 1, 1))
        for r in dst:
            self.recorded[r], self.contexts[r] = self.recorded[src], self.contexts[src]

    # ------------------------------------------------------------------ per call
    def plan(self, rows: Sequence[int], context: bool, cache_lens: Sequence[int], window: int) -> MemoryPlan:
        """What one call over ``rows`` does with the bank (host logic, one small copy to the device):
        ``context``: the call is a block's context pass; ``cache_lens``: each row's valid window keys of the
        ``window`` keys the cache hands to attention."""
        rows, S = list(rows), self.frame_tokens
        record = [b for b, r in enumerate(rows) if context and self.contexts[r] % self.interval == 0]
        full = [self.recorded[rows[b]] >= self.frames for b in record]
        held = [self.held(r) for r in rows]
        plan = MemoryPlan(held=held, record=record, full=full, context=context, rows=rows)
        device = lambda t: t.to(self.device, non_blocking=True)   # noqa: E731
        plan.row_index = device(torch.tensor(rows, dtype=torch.long))
        m = max(held) * S
        if m and (len(set(held)) > 1 or any(n != window for n in cache_lens)):
            # rows differ: each row's bank frames moved to just after its own window, the rest masked by its length
            index = []
            for n, h in zip(cache_lens, held):
                own = list(range(n)) + list(range(window, window + h * S))
                index.append(own + [0] * (window + m - len(own)))
            plan.gather = device(torch.tensor(index, dtype=torch.long))
            plan.kv_lens = device(torch.tensor([n + h * S for n, h in zip(cache_lens, held)], dtype=torch.long))
        if record:
            packed = torch.tensor([record, [rows[b] for b in record],
                                   [min(self.recorded[rows[b]], self.frames - 1) for b in record],
                                   [int(f) for f in full]], dtype=torch.long)
            packed = device(packed)
            plan.record_index, plan.record_rows, plan.record_slot = packed[0], packed[1], packed[2]
            plan.record_full = packed[3] != 0
        return plan

    def attended(self, li: int, plan: MemoryPlan, k: torch.Tensor, v: torch.Tensor,
                 kv_lens: Optional[torch.Tensor]):
        """The keys/values a call attends to: its window's ``k, v`` [B, Lc, H, dh] with each row's bank frames
        after them. Returns (k, v, kv_lens or None)."""
        m = max(plan.held) * self.frame_tokens
        if not m:
            return k, v, kv_lens
        bank_k = self.k[li].index_select(0, plan.row_index)[:, :m]
        bank_v = self.v[li].index_select(0, plan.row_index)[:, :m]
        k, v = torch.cat([k, bank_k], 1), torch.cat([v, bank_v], 1)
        if plan.gather is None:
            return k, v, kv_lens
        pick = plan.gather[:, :, None, None].expand(-1, -1, *k.shape[2:])
        return k.gather(1, pick), v.gather(1, pick), plan.kv_lens

    def record(self, li: int, plan: MemoryPlan, k_new: torch.Tensor, v_new: torch.Tensor,
               text_k: Optional[torch.Tensor]) -> None:
        """The recording rows' first new frame (post-RoPE keys, values) into the bank: the next slot while there
        is room, else the slot of the frame least relevant to the prompt (``memory_saliency`` over ``text_k``
        [B, H, Ltxt, dh], the call's rows). Device work only."""
        if not plan.record:
            return
        S = self.frame_tokens
        b = plan.record_index
        slot = plan.record_slot
        if any(plan.full):
            if text_k is None:
                raise RuntimeError("the memory bank scores its frames against the prompt: set_prompt first")
            bank_k = self.k[li].index_select(0, plan.record_rows)
            worst = memory_saliency(text_k.index_select(0, b), bank_k, S).argmin(dim=1)
            slot = torch.where(plan.record_full, worst, slot)
        flat = ((plan.record_rows * self.frames + slot)[:, None] * S + torch.arange(S, device=self.device)).reshape(-1)
        for store, new in ((self.k[li], k_new), (self.v[li], v_new)):
            first = new.index_select(0, b)[:, :S].reshape(-1, *new.shape[2:])
            store.view(-1, *new.shape[2:]).index_copy_(0, flat, first.to(store.dtype))

    def commit(self, plan: MemoryPlan) -> None:
        for b in plan.record:
            self.recorded[plan.rows[b]] += 1
        if plan.context:
            for r in plan.rows:
                self.contexts[r] += 1
