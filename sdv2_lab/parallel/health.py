"""A rank that fails or stops answering ends the whole job within a timeout, with an error naming the rank and
what it was doing.

Every rank publishes a heartbeat in the job's key-value store (the launcher's TCPStore): what it is doing now
(``doing("waiting for activations of job 17 slot 1 from rank 0")``, a plain attribute write on the hot path)
and a progress counter. A background thread writes it every ``interval`` seconds and reads the others'. The
job ends when

* a rank raises: it writes the ``abort`` key ("rank 1 (blocks 3-5, VAE decode) failed while <doing>: <error>")
  and exits; the others see the key within ``interval`` and stop (their waits poll ``check()``);
* a rank stops answering: its heartbeat stops changing (a frozen or killed process) for ``timeout`` seconds;
  the first rank to notice writes ``abort`` naming it and what it last said it was doing;
* a wait on a peer exceeds ``stall_timeout`` although the peer is alive (a peer stuck in its own loop): the
  waiting rank aborts naming the peer and the peer's last activity. A wait on a peer whose heartbeat is fresh
  is slowness, not a failure, until then: the ``timeout`` is for silence (a 14B stage build, or a rank on a
  loaded CPU, takes longer than any timeout for silence should be).

A main thread that does not reach a ``check()`` (stuck inside a C++ call) is ended by the thread ``grace``
seconds after the abort: the process exits with the message on stderr. The launcher reads ``abort`` and raises
``PipeError`` with it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

ABORT = "abort"


class PipeError(RuntimeError):
    """The pipeline job ended because a rank failed or stopped answering (the message says which and why)."""


class Health:
    def __init__(self, store, rank: int, world: int, role: str, timeout_s: float = 60.0,
                 interval_s: Optional[float] = None, grace_s: float = 3.0, stall_timeout_s: float = 1800.0,
                 quiet: bool = False):
        self.store, self.rank, self.world, self.role = store, rank, world, role
        self.timeout = float(timeout_s)
        self.stall = max(float(stall_timeout_s), self.timeout)
        self.quiet = quiet            # launched by our launcher: it reports the abort (one line), not each rank
        self.interval = interval_s or min(1.0, max(0.05, self.timeout / 8))
        self.grace = grace_s
        self.activity = "starting"
        self.progress = 0
        self.aborted: Optional[str] = None
        self._seen: dict[int, tuple[str, float]] = {}     # peer -> (last heartbeat value, when it last changed)
        self._stop = threading.Event()
        self._done = False
        self._thread: Optional[threading.Thread] = None
        if store is not None:
            self._beat()
            self._thread = threading.Thread(target=self._run, name=f"pipe-health-{rank}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the main thread
    def doing(self, what: str) -> None:
        self.activity = what
        self.progress += 1

    def check(self) -> None:
        """Raise if the job was aborted (by any rank)."""
        if self.aborted is not None:
            raise PipeError(self.aborted)

    def peer(self, rank: int) -> str:
        """What a peer last reported, for error messages."""
        if self.store is None:
            return "unknown"
        try:
            raw = self.store.get(f"hb/{rank}").decode()
            hb = json.loads(raw)
            return f"{hb['activity']!r}, {time.time() - hb['t']:.1f} s ago"
        except Exception:  # noqa: BLE001
            return "no heartbeat"

    def stalled(self, peer: int, what: str, waited: float) -> PipeError:
        """The error for a wait on ``peer`` that exceeded the timeout (and the job is aborted with it)."""
        msg = (f"pipe rank {self.rank} ({self.role}) waited {waited:.1f} s (mode.stall_timeout_s={self.stall:g}) "
               f"{what} although rank {peer} answers; rank {peer} last reported: {self.peer(peer)}")
        self.abort(msg)
        return PipeError(msg)

    def fail(self, exc: BaseException) -> str:
        """This rank raised: abort the job naming it. Returns the message."""
        if isinstance(exc, PipeError) and self.aborted:
            return self.aborted
        msg = f"pipe rank {self.rank} ({self.role}) failed while {self.activity}: {type(exc).__name__}: {exc}"
        self.abort(msg)
        return self.aborted or msg

    def abort(self, msg: str) -> None:
        if self.store is not None:
            try:
                self.store.compare_set(ABORT, "", msg)       # the first message wins
                msg = self.store.get(ABORT).decode() or msg
            except Exception:  # noqa: BLE001 -- the store may be gone with the launcher
                pass
        if self.aborted is None:
            self.aborted = msg

    def close(self, finished: bool = True) -> None:
        """Stop the heartbeat (a finished rank says so: its peers do not mistake its silence for a hang)."""
        self._done = finished
        if finished:
            self.activity = "finished"
            self._beat()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def publish(self) -> None:
        """Publish the heartbeat now (the thread does every ``interval``)."""
        if self.store is not None:
            self._beat()

    # ------------------------------------------------------------------ the heartbeat thread
    def _beat(self) -> None:
        try:
            self.store.set(f"hb/{self.rank}", json.dumps({"t": time.time(), "activity": self.activity,
                                                          "progress": self.progress, "done": self._done}))
        except Exception:  # noqa: BLE001
            pass

    def _run(self) -> None:
        aborted_at = None
        while not self._stop.wait(self.interval):
            self._beat()
            try:
                if self.aborted is None and self.store.check([ABORT]):
                    msg = self.store.get(ABORT).decode()
                    if msg:
                        self.aborted = msg
                if self.aborted is None:
                    self._watch_peers()
            except Exception:  # noqa: BLE001 -- the launcher's store went away: the launcher is gone
                if self.aborted is None:
                    self.aborted = f"pipe rank {self.rank}: lost the job's store (the launcher ended)"
            if self.aborted is not None:
                aborted_at = aborted_at or time.monotonic()
                if time.monotonic() - aborted_at > self.grace:  # the main thread did not get out by itself
                    if not self.quiet:
                        sys.stderr.write(f"{self.aborted}\n[pipe rank {self.rank}: ending the process]\n")
                        sys.stderr.flush()
                    os._exit(1)

    def _watch_peers(self) -> None:
        now = time.monotonic()
        for q in range(self.world):
            if q == self.rank:
                continue
            try:
                raw = self.store.get(f"hb/{q}").decode() if self.store.check([f"hb/{q}"]) else ""
            except Exception:  # noqa: BLE001
                raw = ""
            last, since = self._seen.get(q, (None, now))
            if raw != last:
                self._seen[q] = (raw, now)
                continue
            if raw and json.loads(raw).get("done"):
                continue
            if now - since > self.timeout:
                what = json.loads(raw)["activity"] if raw else "starting (never reported)"
                self.abort(f"pipe rank {q} stopped answering: no heartbeat for {now - since:.1f} s "
                           f"(timeout {self.timeout:g} s); it was last {what}")
