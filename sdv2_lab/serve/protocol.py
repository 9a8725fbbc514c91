"""Control messages (JSON text WebSocket messages), parsed and checked; every mistake is a ``ProtocolError``
whose code and message go back to that client only.

Client -> server:
    {"type": "start", "prompt": "...", "steps": 2, "noise_scale": 0.8, "taehv": false, "seed": 1, "output": "ws"}
    {"type": "prompt", "prompt": "..."}       applied mid-stream (only the prompt's cross-attention changes)
    {"type": "noise_scale", "value": 0.6}     mid-stream: the noise controller's target from the next chunk on
    {"type": "steps", "value": 1}             restarts the stream with that many denoising steps
    {"type": "taehv", "on": true}             restarts the stream with the TAEHV decoder (or the config's VAE)
    {"type": "pause"} / {"type": "resume"}    pause keeps the stream (and its rows); frames are ignored meanwhile
    {"type": "stop"}                          ends the stream (the socket stays open for another start)
Server -> client: {"type": "started" | "ack" | "info" | "error" | "busy" | "stats" | "stopped", ...}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

CONTROLS = ("start", "prompt", "noise_scale", "steps", "taehv", "pause", "resume", "stop")
COALESCED = ("prompt", "noise_scale", "steps", "taehv")   # a newer one replaces one still queued (latest wins)
OUTPUTS = ("ws", "mjpeg")
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2 ** 63 - 1           # torch generators take 64-bit seeds
MAX_INT_DIGITS = 30              # longer integers in a message are never a valid value (and slow to convert)


class HugeNumber:
    """An integer literal of more digits than any valid value has, kept as text (Python refuses to convert
    4300+ digits, and would spend quadratic time on fewer): the field it is in says it is out of range."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"a {len(self.digits.lstrip('-'))}-digit number"


def _int(text: str):
    return int(text) if len(text) <= MAX_INT_DIGITS else HugeNumber(text)


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def reply(self) -> dict:
        return {"type": "error", "code": self.code, "message": str(self)}


@dataclass
class StreamOptions:
    """What a client's stream is opened with (``start``; ``steps`` / ``taehv`` change it by reopening)."""
    prompt: str
    steps: int
    noise_scale: float
    taehv: bool = False
    seed: Optional[int] = None
    output: str = "ws"


def parse(text: str) -> dict:
    """A control message: a JSON object with a known ``type``."""
    try:
        msg = json.loads(text, parse_int=_int)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"the message is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", f"a control message is a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in CONTROLS:
        raise ProtocolError("unknown_control", f"unknown control type {kind!r}; known: {', '.join(CONTROLS)}")
    return msg


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"a {len(str(abs(value)))}-digit number" if value.bit_length() > 128 else repr(value)
    return repr(value)


def prompt_of(msg: dict, default: Optional[str] = None) -> str:
    p = msg.get("prompt", default)
    if not isinstance(p, str) or not p.strip():
        raise ProtocolError("bad_value", "prompt must be a non-empty string describing the target style")
    if len(p) > MAX_PROMPT_CHARS:
        raise ProtocolError("bad_value", f"prompt is {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    return p.strip()


def steps_of(value: Any, max_steps: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_steps:
        raise ProtocolError("bad_value", f"steps must be an integer from 1 to {max_steps}, got {value!r}")
    return value


def noise_scale_of(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ProtocolError("bad_value", f"noise_scale must be a number in (0, 1], got {value!r}")
    return float(value)


def bool_of(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("bad_value", f"{name} must be true or false, got {value!r}")
    return value


def start_options(msg: dict, *, default_prompt: str, default_steps: int, default_noise: float,
                  max_steps: int) -> StreamOptions:
    seed = msg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ProtocolError("bad_value", f"seed must be an integer from 0 to 2**63-1 or null, got {_short(seed)}")
    output = msg.get("output", "ws")
    if output not in OUTPUTS:
        raise ProtocolError("bad_value", f"output must be one of {OUTPUTS}, got {output!r}")
    return StreamOptions(prompt=prompt_of(msg, default_prompt),
                         steps=steps_of(msg.get("steps", default_steps), max_steps),
                         noise_scale=noise_scale_of(msg.get("noise_scale", default_noise)),
                         taehv=bool_of(msg.get("taehv", False), "taehv"), seed=seed, output=output)
