"""A stream's causal VAE state, and the batch of streams one VAE call runs over.

A streaming VAE remembers, per stream and per causal layer, only the last frames that layer saw: 2 input
frames for a 3-tap causal conv, 1 for a temporal downsampler or a TAEHV ``MemBlock``. ``StreamCache`` holds
those *history* tensors (one per layer slot) for one encoder or decoder of one stream; nothing else is kept
per stream: padded buffers and activations belong to a call (its workspace), so a stream costs its history
and no more (``state_nbytes``; e.g. the Wan VAE at 480x832 in bf16: 1.04 GiB encoder + 1.76 GiB decoder,
LightVAE a quarter of that).

One call encodes (or decodes) the chunks of several streams at once, as the DiT batches its KV rows: the
streams' inputs are stacked on the batch dimension and ``Batch`` joins their caches, stream i owning batch
row i. A layer reads the joined history (``Batch.history``, or ``Batch.read`` into a buffer it provides) and
writes its new tail back (``Batch.keep``). With a single stream these are the stream's own tensors: no join,
no copy beyond the one the layer always makes. Streams join and leave between calls freely: a batch is made
per call, and each stream's state lives in its own cache.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence

import torch

_uids = itertools.count()


class StreamCache:
    """The history tensors of one encoder or decoder of one stream, by slot (made at first use, zeros = the
    zero padding at the stream's start, then updated in place)."""

    def __init__(self):
        self.history: dict = {}
        self.first = True          # the stream's first call (frame 0 / latent 0 alone) is special-cased
        self.uid = next(_uids)     # never reused: CUDA graphs of a batch of streams are keyed by these

    def get(self, slot, like: torch.Tensor, frames: int, dim: int = 2) -> torch.Tensor:
        """This stream's history of ``slot``: ``like``'s shape with ``frames`` along ``dim`` (made once)."""
        h = self.history.get(slot)
        if h is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"VAE history slot {slot!r} would be made inside a CUDA graph capture")
            shape = list(like.shape)
            shape[dim] = frames
            fmt = torch.channels_last_3d if _is_channels_last(like) else torch.contiguous_format
            h = torch.zeros(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=fmt)
            self.history[slot] = h
        return h

    def tensors(self) -> list[torch.Tensor]:
        return list(self.history.values())

    def restart(self) -> None:
        """Make this cache a new stream's, in place: every history zeroed (the zero padding at a stream's start),
        its tensors and uid kept, so that the CUDA graphs captured for it replay for the new stream."""
        for h in self.history.values():
            h.zero_()
        self.first = True


class Batch:
    """The caches of the streams one call runs over; stream i is batch row i (a single cache may hold any
    number of rows: a caller's own batch)."""

    def __init__(self, caches: Sequence[StreamCache]):
        if not caches:
            raise ValueError("a VAE call needs at least one stream state")
        self.caches = list(caches)
        firsts = {c.first for c in self.caches}
        if len(firsts) > 1:
            raise ValueError("a VAE call mixes streams at their first call with streams past it; call them apart")
        self.key = tuple(c.uid for c in self.caches)

    @property
    def first(self) -> bool:
        return self.caches[0].first

    @first.setter
    def first(self, value: bool) -> None:
        for c in self.caches:
            c.first = value

    def _rows(self, like: torch.Tensor) -> list[torch.Tensor]:
        if len(self.caches) == 1:
            return [like]
        if like.shape[0] != len(self.caches):
            raise ValueError(f"a call over {len(self.caches)} streams takes one batch row per stream, "
                             f"got {like.shape[0]} rows")
        return list(like.split(1))

    def history(self, slot, like: torch.Tensor, frames: int, dim: int = 2) -> torch.Tensor:
        """The streams' joined history of ``slot`` (one stream: its own tensor, no copy)."""
        hs = [c.get(slot, row, frames, dim) for c, row in zip(self.caches, self._rows(like))]
        return hs[0] if len(hs) == 1 else torch.cat(hs)

    def read(self, slot, out: torch.Tensor, like: torch.Tensor, frames: int, dim: int = 2) -> None:
        """Copy the streams' history of ``slot`` into ``out`` (e.g. the head of a call's padded buffer). A
        history kept in another memory layout than a channels-last ``out`` is converted once (then the copies
        in and out are plain)."""
        want_cl = out.dim() == 5 and out.shape[1] > 1 and out.stride(1) == 1
        for c, row, dst in zip(self.caches, self._rows(like), self._rows(out)):
            h = c.get(slot, row, frames, dim)
            if want_cl and not _is_channels_last(h):
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(f"VAE history slot {slot!r} would change layout inside a CUDA graph capture")
                h = c.history[slot] = h.contiguous(memory_format=torch.channels_last_3d)
            dst.copy_(h)

    def keep(self, slot, tail: torch.Tensor) -> None:
        """``tail`` (the last frames this call saw, all rows) becomes the streams' history of ``slot``."""
        for c, row in zip(self.caches, self._rows(tail)):
            h = c.history[slot]
            if h.data_ptr() != row.data_ptr() or h.stride() != row.stride():
                h.copy_(row)

    def sole_history(self, slot) -> Optional[torch.Tensor]:
        """The history tensor of ``slot`` when the call runs over ONE stream (a producer may then write the new
        history itself instead of ``keep`` copying it afterwards), else None."""
        return self.caches[0].history.get(slot) if len(self.caches) == 1 else None


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        and not x.is_contiguous()


def state_nbytes(state) -> int:
    """Bytes of device memory a stream's VAE state holds (its history tensors, shared storage counted once)."""
    seen, total = set(), 0
    for cache in _caches_in(state):
        for t in cache.tensors():   # (meta tensors have no storage: each counts)
            key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _caches_in(obj, depth: int = 0) -> Iterable[StreamCache]:
    if isinstance(obj, StreamCache):
        yield obj
    elif depth < 3 and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _caches_in(v, depth + 1)


def restart_parts(state, encoder: bool, decoder: bool) -> None:
    """A VAE state's ``enc`` / ``dec`` caches and their counters (``frames_in`` / ``latents_in``) made a new
    stream's in place (``StreamCache.restart``): what every state's ``restart`` does for its own parts."""
    if encoder:
        state.enc.restart()
        state.frames_in = 0
    if decoder:
        state.dec.restart()
        state.latents_in = 0


def check_same_phase(states: Sequence, counter: str) -> bool:
    """True when every state is at its stream's first call, False when every one is past it; else an error."""
    firsts = {getattr(s, counter) == 0 for s in states}
    if len(firsts) > 1:
        raise ValueError("a VAE call mixes streams at their first call with streams past it; call them apart")
    return firsts.pop()


def one_size(states: Sequence, size: tuple, what: str) -> None:
    """Every state takes the frame size ``size`` (fixed at its stream's first call)."""
    size = tuple(int(s) for s in size)
    for st in states:
        if st.size is None:
            st.size = size
        elif st.size != size:
            raise ValueError(f"{what} size {size[0]}x{size[1]} differs from this stream's {st.size[0]}x"
                             f"{st.size[1]}; start a new stream (new_state) for a new size")


def release_graphs(steps: dict, states: Iterable, attrs: Sequence[str]) -> None:
    """Drop the CUDA graphs (``accel.CUDAGraphed``) captured for batches that include these streams."""
    uids = {getattr(s, a).uid for s in states for a in attrs if getattr(s, a, None) is not None}
    for step in steps.values():
        forget: Optional[callable] = getattr(step, "forget", None)
        if forget is not None:
            forget(uids)


@torch.no_grad()
def per_stream_bytes(vae, height: int, width: int, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of VAE state one stream holds at ``height`` x ``width``: a throw-away stream (a first chunk, then a
    steady one, encode and decode) is run and its history counted, in ``dtype``'s element size if given (else
    the VAE's own). On a VAE built on the meta device this is an exact count at no cost (shapes only); on a GPU
    it is the real thing."""
    p = next(vae.parameters())
    state = vae.new_state()
    first = torch.zeros(1, 3, 5, height, width, device=p.device, dtype=p.dtype)
    z = vae.encode(state, first)
    vae.encode(state, first[:, :, 1:])
    vae.decode(state, z)
    vae.decode(state, z[:, :1])
    if hasattr(vae, "release"):
        vae.release(state)
    if dtype is None:
        return state_nbytes(state)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for c in _caches_in(state) for t in c.tensors()) * size
