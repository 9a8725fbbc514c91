"""Bad numbers in: frames that are non-finite (NaN, +-inf) or far outside [-1, 1] never reach a stream's state,
and are reported by stream, chunk and frame, without a host sync per chunk.

Per input chunk, on the encode lane (device ops only): the largest |x| of each frame, the first bad frame kept
in the stream's small device record (``Checks``), and the bad values replaced (NaN -> 0, +-inf -> +-1; with
``clamp`` also everything to [-1, 1]), so the KV cache, the VAE's causal history and the noise controller only
ever see finite numbers. Each decoded chunk also records whether its frames are finite (a stream whose state
went non-finite some other way). The host reads these records only where it reads a finished chunk anyway
(``verify``: ``stream_clips`` after a chunk's event, the staged API after its copy to the host, the server's
tick), so the check costs a few small kernels per chunk and no wait.

Modes (``PipelineConfig.input_guard``, config key ``input_guard``):

* ``raise`` (default): the first read after a bad frame raises ``InputError`` naming the stream, the chunk and
  the frame; the stream is refused from then on (``StreamRefused``: open a new one; its rows are reset then);
* ``clamp``: bad values are zeroed / clamped, one warning per stream, the stream goes on;
* ``off``: nothing checked, nothing replaced (a benchmark of the bare engine).

A chunk whose output is not finite ends its stream in every mode but ``off`` (``InputError`` saying so).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

MODES = ("raise", "clamp", "off")
NONE = math.inf     # "no bad frame yet" in the device record


class InputError(ValueError):
    """A stream's input had non-finite or out-of-range values, or its output went non-finite (the message says
    which stream, chunk and frame); the stream is refused from then on."""


class StreamRefused(RuntimeError):
    """The stream was stopped after bad numbers (``InputError``): open a new stream."""


@dataclass
class Checks:
    """One stream's records, on the device (float64, ``inf`` = none). ``record`` (written on the encode lane):
    [first bad input frame, its chunk, its largest |x|, bad frames so far]; ``out`` (written on the decode lane):
    the first output chunk that was not finite. On the host: frames and chunks checked so far, the last decoded
    chunk's snapshot, and whether the stream was refused."""
    record: torch.Tensor
    out: torch.Tensor
    frames: int = 0
    chunks: int = 0
    last: Optional[torch.Tensor] = None
    warned: bool = False
    refused: Optional[str] = None


@dataclass
class InputGuard:
    mode: str = "raise"
    limit: float = 1.5          # |x| above this is out of range (resampled frames overshoot [-1, 1] a little)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"input_guard={self.mode!r}: expected one of {', '.join(MODES)}")
        if not (isinstance(self.limit, (int, float)) and self.limit >= 1):
            raise ValueError(f"input_limit={self.limit!r}: expected a number >= 1 (|x| above it is out of range)")

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def new(self, device) -> Checks:
        return Checks(torch.tensor([NONE, NONE, 0.0, 0.0], dtype=torch.float64, device=device),
                      torch.tensor([NONE], dtype=torch.float64, device=device))

    # ------------------------------------------------------------------ device side (no sync)
    def check_chunk(self, checks: Checks, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, 3, T, H, W] of one input chunk -> the frames with bad values replaced; the stream's record
        updated (a new tensor: a decode already holding the old one reads a consistent record)."""
        if not self.on:
            return frames
        t = frames.shape[2]
        peak = frames.abs().amax(dim=(0, 1, 3, 4))                       # [T]; NaN where a NaN is
        bad = ~(peak <= self.limit)                                       # NaN and inf are bad too
        local = torch.where(bad, torch.arange(t, device=frames.device), t).min()
        first = torch.where(local < t, local.double() + checks.frames, NONE)
        value = torch.cat([peak.double(), peak.new_zeros(1, dtype=torch.float64)]).index_select(0, local[None])[0]
        chunk = torch.where(local < t, float(checks.chunks), NONE).double()
        now = torch.stack([first, chunk, value, checks.record[3] + bad.sum()])
        keep = checks.record[0] < NONE                                    # the first bad frame of the stream wins
        checks.record = torch.where(keep, torch.cat([checks.record[:3], now[3:]]), now)
        checks.frames += t
        checks.chunks += 1
        fixed = torch.nan_to_num(frames, nan=0.0, posinf=1.0, neginf=-1.0)
        return fixed.clamp_(-1, 1) if self.mode == "clamp" else fixed

    def snapshot(self, checks: Checks, frames: torch.Tensor, index: int) -> Optional[torch.Tensor]:
        """At the decode of output chunk ``index``: whether its frames are finite (kept in ``checks.out``), and the
        snapshot [input record, first non-finite output chunk] that ``verify`` reads once the chunk is read."""
        if not self.on:
            return None
        finite = torch.sum(frames, dtype=torch.float32).isfinite()       # frames in [0, 1] cannot overflow
        checks.out = torch.where((checks.out < NONE) | finite, checks.out, float(index))
        snap = torch.cat([checks.record, checks.out])
        if snap.is_cuda:   # to the host with the chunk's own work: reading it later waits for nothing
            host = torch.empty(snap.shape, dtype=snap.dtype, pin_memory=True)
            host.copy_(snap, non_blocking=True)
            snap = host
        checks.last = snap
        return snap

    # ------------------------------------------------------------------ host side (where a chunk is read)
    def verify(self, stream_id: int, checks: Checks, snap: Optional[torch.Tensor]) -> None:
        """Read a decoded chunk's snapshot: a host tensor (copied asynchronously at the decode), valid once the
        chunk's event has completed, so reading it waits for nothing. Raises ``InputError`` (raise mode, or
        non-finite output) and refuses the stream; warns once in clamp mode."""
        if snap is None or checks.refused:
            return
        first, chunk, value, count, out_chunk = snap.tolist()
        if first < NONE:
            what = ("NaN" if math.isnan(value) else "an infinite value" if math.isinf(value)
                    else f"values up to |x| = {value:g}, outside [-1, 1]")
            where = (f"stream {stream_id}: input chunk {int(chunk)}, frame {int(first)} (counting from 0 in the "
                     f"stream) has {what}" + (f" ({int(count)} bad frame(s) so far)" if count > 1 else ""))
            if self.mode == "clamp":
                if not checks.warned:
                    checks.warned = True
                    log.warning("%s: non-finite values zeroed, the rest clamped to [-1, 1] (input_guard=clamp); "
                                "later bad frames of this stream are fixed without a warning", where)
            else:
                self.refuse(checks, f"{where}; frames must be finite and in [-1, 1] (input_guard=clamp zeroes / "
                                    f"clamps such values instead). The stream was stopped: open a new one")
        if out_chunk < NONE and not checks.refused:
            self.refuse(checks, f"stream {stream_id}: its output went non-finite (NaN or inf in output chunk "
                                f"{int(out_chunk)}) although its input was finite; the stream was stopped: open a new "
                                f"one")

    def refuse(self, checks: Checks, msg: str) -> None:
        checks.refused = msg
        raise InputError(msg)

    @staticmethod
    def require(stream_id: int, checks: Optional[Checks]) -> None:
        """Refuse work on a stream that was stopped after bad numbers."""
        if checks is not None and checks.refused:
            raise StreamRefused(f"stream {stream_id} was stopped after bad numbers ({checks.refused.split('; ')[0]}): "
                                f"open a new stream")
