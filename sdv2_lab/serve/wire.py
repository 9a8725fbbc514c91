"""Frames on the wire: JPEG in and out, and the small binary tag that lets a client match an output frame to
the input frame it came from (for latency).

Client -> server (binary WebSocket message): a JPEG, optionally preceded by a 16-byte tag
    b"SDV2" | seq: uint32 | client time in ms: float64          (big-endian; the client's own clock)
Server -> client (binary WebSocket message): a 24-byte header, then the restyled frame as a JPEG
    b"SDV2" | seq: uint32 | client time in ms: float64 | output frame index: uint32 | server latency ms: float32
``seq`` and the client time are echoed from the input frame that this output frame restyles, so the client's
latency is ``now - client time`` on its own clock. Untagged input frames get seq = the server's count, time 0.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAGIC = b"SDV2"
IN_TAG = struct.Struct(">4sId")          # 16 bytes
OUT_HEADER = struct.Struct(">4sIdIf")    # 24 bytes
JPEG_SOI = b"\xff\xd8"


class FrameError(ValueError):
    """A frame that cannot be used; ``code`` names the kind for the client (bad_image, bad_size)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Tag:
    seq: int
    client_ms: float


def split_tag(data: bytes, fallback_seq: int) -> tuple[Tag, bytes]:
    """(tag, JPEG bytes) of an input message."""
    if data[:4] == MAGIC:
        if len(data) < IN_TAG.size:
            raise FrameError("bad_image", f"a tagged frame needs a {IN_TAG.size}-byte tag, got {len(data)} bytes")
        _, seq, client_ms = IN_TAG.unpack_from(data)
        return Tag(seq, client_ms), data[IN_TAG.size:]
    return Tag(fallback_seq, 0.0), data


def pack_input(jpeg: bytes, seq: int, client_ms: float) -> bytes:
    return IN_TAG.pack(MAGIC, seq & 0xFFFFFFFF, client_ms) + jpeg


def pack_output(jpeg: bytes, tag: Tag, index: int, server_ms: float) -> bytes:
    return OUT_HEADER.pack(MAGIC, tag.seq & 0xFFFFFFFF, tag.client_ms, index & 0xFFFFFFFF, server_ms) + jpeg


def unpack_output(data: bytes) -> tuple[Tag, int, float, bytes]:
    """(tag, output frame index, server latency ms, JPEG) of an output message (for scripted clients)."""
    magic, seq, client_ms, index, server_ms = OUT_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not an sdv2 output frame")
    return Tag(seq, client_ms), index, server_ms, data[OUT_HEADER.size:]


def decode_jpeg(data: bytes, height: int, width: int, *, resize: bool, max_pixels: int) -> tuple[np.ndarray, bool]:
    """JPEG bytes -> (RGB uint8 [height, width, 3], whether it was resized). A frame of another size is
    centre-cropped to the target's aspect and resized (``resize``) or refused."""
    if not data.startswith(JPEG_SOI):
        raise FrameError("bad_image", "the frame is not a JPEG (it does not start with FF D8); send image/jpeg bytes")
    try:
        try:
            img = Image.open(io.BytesIO(data), formats=["JPEG"])
        except Image.DecompressionBombError as exc:   # PIL's own limit: a header of a huge size
            raise FrameError("bad_size", f"the frame's header says it is larger than serve.max_frame_pixels="
                                         f"{max_pixels} allows ({exc}); send frames of {width}x{height}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise FrameError("bad_size", f"the frame is {w}x{h} ({w * h} pixels), over serve.max_frame_pixels="
                                         f"{max_pixels}; send frames of {width}x{height}")
        resized = (w, h) != (width, height)
        if resized and not resize:
            raise FrameError("bad_size", f"the frame is {w}x{h} but this server takes {width}x{height} exactly "
                                         f"(serve.resize=false): resize it before sending")
        if resized:
            img.draft("RGB", (width, height))   # DCT-domain downscale of large frames while decoding
        img = img.convert("RGB")
        if resized:
            img = img.resize((width, height), Image.BILINEAR, box=_cover_box(img.size, width, height))
        return np.asarray(img), resized
    except FrameError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FrameError("bad_image", f"the JPEG does not decode: {exc}") from None


def _cover_box(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The centred crop of an image of ``size`` with the aspect ratio of width x height."""
    w, h = size
    target = width / height
    if w / h > target:       # too wide: crop the sides
        cw = h * target
        return ((w - cw) / 2, 0, (w + cw) / 2, h)
    ch = w / target
    return (0, (h - ch) / 2, w, (h + ch) / 2)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
