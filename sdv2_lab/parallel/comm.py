"""Point-to-point activation traffic between pipe stages: asynchronous, ordered, double-buffered.

A ``Link`` is one direction between two ranks on one process group. Sends are ``isend``s that keep their
tensors alive until they completed: at most ``depth`` messages are in flight, and a send beyond that first
waits for the oldest (so a buffer is never reused while a send still reads it). Receives are ``irecv``s into
buffers from a ``BufferPool``: posted ahead (the next unit's while this one computes), waited when needed, and
given back by the consumer; a buffer that was forwarded goes back only once that send completed.

On CUDA (NCCL) a wait makes the current stream wait for the transfer and never blocks the host; a buffer is
posted for a new receive only after the work reading it was queued on the current stream (torch orders the
NCCL stream after the current one), so no host sync is needed. On CPU (gloo) a wait polls the work, checking
``Health`` so that a failed or silent peer ends the job within the timeout with a message naming it.

Host-staged links (``staged``: GPUs without NCCL between them, e.g. several stages sharing one GPU, which NCCL
refuses): tensors go through pinned host memory over gloo. A send copies out and waits for that copy (a host
sync per message: a transport for checking and for odd machines, not for speed); a receive lands in host memory
and is copied to the device when waited for.

Message order is what matches sends to receives (NCCL ignores tags): both ends of a link issue their
operations in the same order, which the lockstep schedule guarantees. Every link has a process group of its
own (r -> r+1, and the way back from the last stage to the first), so that operations on different links
never queue behind each other on one NCCL stream.
"""
from __future__ import annotations

import datetime
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .health import Health, PipeError

TAG_FWD, TAG_RET, TAG_MOVE = 11, 12, 13


class Op:
    """One async operation (a ``dist`` work) and whether waiting for it blocks the host (gloo) or not (NCCL)."""
    __slots__ = ("work", "host", "done")

    def __init__(self, work, host: bool):
        self.work, self.host, self.done = work, host, False

    def is_completed(self) -> bool:
        """Known to be finished (gloo reports completion only through ``wait``: until then, False)."""
        return self.done or (not self.host and self.work.is_completed())


def wait_work(op: Optional[Op], health: Optional[Health], peer: int, what: str) -> None:
    """Wait for one async operation. CUDA: the current stream waits (no host block; NCCL's watchdog and the
    heartbeats handle a silent peer). CPU: the host blocks as long as the peer is alive: a peer that died closes
    the connection at once (the job's abort message names it), one that went silent is named by the heartbeats
    (the health thread then ends this process), and a wait on a live peer ends only after the stall timeout
    (a gloo wait cannot be resumed after it timed out: it closes the connection, so it is waited for whole)."""
    if op is None or op.done:
        return
    if health is None or not op.host:
        op.work.wait()
        op.done = True
        return
    health.check()
    start = time.monotonic()
    try:
        op.work.wait(datetime.timedelta(seconds=health.stall))
    except Exception as exc:  # noqa: BLE001 -- timed out, or the peer went away
        waited = time.monotonic() - start
        deadline = time.monotonic() + 3 * health.interval   # a failing peer publishes why before it exits
        while health.aborted is None and time.monotonic() < deadline:
            time.sleep(health.interval / 4)
        health.check()
        if waited >= 0.95 * health.stall:
            raise health.stalled(peer, what, waited) from None
        msg = (f"pipe rank {health.rank} ({health.role}) lost rank {peer} while waiting {what}: "
               f"{str(exc).splitlines()[0][:200]}; rank {peer} last reported: {health.peer(peer)}")
        health.abort(msg)
        raise PipeError(health.aborted or msg) from None
    op.done = True


class CopyDone:
    """A device copy out of a staging buffer, as a completion the pool can ask about."""
    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event()
        self.event.record()

    def is_completed(self) -> bool:
        return self.event.query()


@dataclass
class Buffer:
    tensor: torch.Tensor
    busy: list = field(default_factory=list)   # sends (or staging copies) still reading it
    host: Optional[torch.Tensor] = None        # staged links: the pinned host buffer the receive lands in


class BufferPool:
    """Receive buffers by (shape, dtype): reused once given back and once no send reads them."""

    def __init__(self, device: torch.device, staged: bool = False):
        self.device, self.staged = device, staged
        self.free: dict[tuple, list[Buffer]] = {}
        self.allocated = 0

    def take(self, shape, dtype) -> Buffer:
        key = (tuple(shape), dtype)
        pool = self.free.setdefault(key, [])
        for i, b in enumerate(pool):
            if all(w.is_completed() for w in b.busy):
                b.busy.clear()
                return pool.pop(i)
        self.allocated += 1
        host = torch.empty(key[0], dtype=dtype, pin_memory=True) if self.staged else None
        return Buffer(torch.empty(key[0], dtype=dtype, device=self.device), host=host)

    def give(self, buf: Buffer) -> None:
        self.free.setdefault((tuple(buf.tensor.shape), buf.tensor.dtype), []).append(buf)


class Pending:
    """Receives posted on a link, waited together."""

    def __init__(self, link: "Link", bufs: list[Buffer], works: list, what: str):
        self.link, self.bufs, self.works, self.what = link, bufs, works, what
        self.done = False

    def wait(self) -> list[torch.Tensor]:
        if not self.done:
            for w in self.works:
                wait_work(w, self.link.health, self.link.peer, self.what)
            for b in self.bufs:
                if b.host is not None:   # staged: host -> device, the host buffer busy until that copy ran
                    b.tensor.copy_(b.host, non_blocking=True)
                    b.busy.append(CopyDone())
            self.done = True
        return [b.tensor for b in self.bufs]

    def release(self, after: tuple = ()) -> None:
        """The consumer is done with the buffers (queued on the current stream); ``after``: sends that still
        read some of them (the buffer returns to the pool when they completed)."""
        for b in self.bufs:
            b.busy.extend(after)
            self.link.pool.give(b)
        self.bufs = []


class Link:
    def __init__(self, peer: int, group, tag: int, device: torch.device, health: Optional[Health], name: str,
                 depth: int = 2, pool: Optional[BufferPool] = None, staged: bool = False):
        self.peer, self.group, self.tag, self.device = peer, group, tag, device
        self.health, self.name, self.depth, self.staged = health, name, depth, staged
        self.pool = pool or BufferPool(device, staged)
        self.outbox: deque = deque()           # (works, tensors) of sends in flight
        self.posted: deque = deque()           # Pending receives not yet waited (drained at the end)
        self.sent = self.received = 0
        self.bytes_sent = 0

    def send(self, tensors: list[torch.Tensor], what: str) -> list:
        """Send tensors in order. Returns the works (a forwarded receive buffer stays busy until they complete)."""
        while len(self.outbox) >= self.depth:     # double buffering: the oldest send must have left
            works, _, w_what = self.outbox.popleft()
            for w in works:
                wait_work(w, self.health, self.peer, f"to send {w_what} to rank {self.peer}")
        works = []
        tensors = [t.contiguous() for t in tensors]   # kept alive in the outbox until the send completed
        if self.staged:
            tensors = stage_out(tensors)
        for t in tensors:
            works.append(Op(dist.isend(t, self.peer, group=self.group, tag=self.tag), t.device.type == "cpu"))
            self.bytes_sent += t.numel() * t.element_size()
        self.outbox.append((works, tensors, what))
        self.sent += 1
        return works

    def post(self, specs: list[tuple[tuple, torch.dtype]], what: str) -> Pending:
        """Post receives for one message (tensors of these shapes and dtypes, in order)."""
        bufs, works = [], []
        for shape, dtype in specs:
            b = self.pool.take(shape, dtype)
            into = b.host if b.host is not None else b.tensor
            works.append(Op(dist.irecv(into, self.peer, group=self.group, tag=self.tag), into.device.type == "cpu"))
            bufs.append(b)
        p = Pending(self, bufs, works, f"to receive {what} from rank {self.peer}")
        self.posted.append(p)
        while self.posted and self.posted[0].done:
            self.posted.popleft()
        self.received += 1
        return p

    def drain(self) -> None:
        """Wait for everything in flight (the end of a run: no operation may be left unmatched)."""
        while self.outbox:
            works, _, what = self.outbox.popleft()
            for w in works:
                wait_work(w, self.health, self.peer, f"to send {what} to rank {self.peer}")
        while self.posted:
            self.posted.popleft().wait()


def stage_out(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> pinned host copies, complete when this returns (a staged link's send)."""
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    if any(t.device.type == "cuda" for t in tensors):
        torch.cuda.current_stream().synchronize()
    return host
