"""File work off the thread that feeds the GPU: video decoding ahead of use and mp4 encoding behind it, each on a
thread of its own with a bounded queue (PyAV and torch release the GIL while they work).

    for piece in prefetch(iter_video_frames("in.mp4", batch=4), depth=8):   # decoded ahead, in order
        ...
    with BackgroundWriter(VideoWriter("out.mp4", fps=16)) as w:
        w.write(frames)          # returns at once unless `depth` pieces are already waiting

An error on a worker thread is raised in the caller at its next call (``next``, ``write`` or ``close``), with
the worker's traceback chained; nothing is lost silently.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(source: Iterable, depth: int = 8, *, prepare: Optional[Callable] = None,
             name: str = "sdv2-reader") -> Iterator:
    """Iterate ``source`` on a thread, up to ``depth`` items ahead; ``prepare(item)`` runs there too (e.g.
    pinning host memory for a fast copy to the GPU). Stops the thread when the consumer stops early."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in source:
                if not put(prepare(item) if prepare is not None else item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, raised there
            put(_Failure(exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class BackgroundWriter:
    """A writer's ``write`` calls run on a thread of their own, in order; ``close`` waits for them, then closes
    the writer. ``waits`` counts the calls that found the queue full (the writer falling behind)."""

    def __init__(self, writer, depth: int = 32, name: str = "sdv2-writer"):
        self.writer, self.waits, self.written = writer, 0, 0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if self._failure is None:
                try:
                    self.writer.write(item)
                    self.written += len(item)
                except BaseException as exc:  # noqa: BLE001 -- raised in the caller at its next call
                    self._failure = exc

    def _check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"writing {getattr(self.writer, 'path', 'the output')} failed: "
                               f"{type(self._failure).__name__}: {self._failure}") from self._failure

    def write(self, frames) -> None:
        self._check()
        try:
            self._q.put_nowait(frames)
        except queue.Full:
            self.waits += 1
            self._q.put(frames)

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._q.put(_END)
            self._thread.join()

    def close(self):
        self._drain()
        if self._failure is not None:
            self.writer.abort()
            self._check()
        return self.writer.close()

    def abort(self) -> None:
        self._drain()
        self.writer.abort()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        """Wait for the queued writes, then end as the writer itself ends a ``with`` block (a video writer keeps
        what was written on Ctrl-C, drops it on an error)."""
        self._drain()
        if exc_type is None:
            if self._failure is not None:
                self.writer.abort()
                self._check()
            return self.writer.close()
        return self.writer.__exit__(exc_type, exc, tb)
