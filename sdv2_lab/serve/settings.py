"""The server's settings (``serve:`` in ``conf/serve.yaml``), validated before any model is built."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    max_streams: int = 4
    max_steps: Optional[int] = None   # None: the recipe's steps, at least 4 where its step list has them
    max_connections: int = 32
    input_fps: float = 16.0
    inbox_frames: int = 12
    outbox_frames: int = 16
    batch_wait_ms: float = 0.0
    max_message_bytes: int = 2_000_000
    max_frame_pixels: int = 4096 * 1024
    resize: bool = True
    jpeg_quality: int = 80
    default_prompt: str = "a watercolor painting, soft pastel colours"
    taehv_vae: str = "taehv_tiny"
    warmup: Any = "auto"        # auto (on CUDA) | true | false
    log_level: str = "info"
    allowed_origins: list = field(default_factory=list)
    allowed_hosts: list = field(default_factory=list)
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    header_timeout_s: float = 10.0
    target_latency_ms: float = 1000.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "ServeSettings":
        section = {k: (list(v) if k in ("allowed_origins", "allowed_hosts") and v is not None else v)
                   for k, v in dict(section or {}).items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"serve: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**section).validate()

    def validate(self) -> "ServeSettings":
        def positive(name, integer=True):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int if integer else (int, float))) or v <= 0:
                raise ValueError(f"serve.{name} must be a positive {'integer' if integer else 'number'}, got {v!r}")

        for name in ("max_streams", "max_connections", "inbox_frames", "outbox_frames", "max_message_bytes",
                     "max_frame_pixels"):
            positive(name)
        positive("input_fps", integer=False)
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)) \
                or not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"serve.batch_wait_ms must be 0..1000, got {self.batch_wait_ms!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port must be 0..65535 (0 = any free port), got {self.port!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"serve.max_steps must be null (the recipe's) or a positive integer, got "
                             f"{self.max_steps!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"serve.jpeg_quality must be 1..95, got {self.jpeg_quality!r}")
        if self.warmup not in ("auto", True, False):
            raise ValueError(f"serve.warmup must be auto, true or false, got {self.warmup!r}")
        if not isinstance(self.allowed_origins, list) or not all(isinstance(o, str) for o in self.allowed_origins):
            raise ValueError(f"serve.allowed_origins must be a list of origins (e.g. [https://my.host]), got "
                             f"{self.allowed_origins!r}")
        if not isinstance(self.allowed_hosts, list) or not all(isinstance(h, str) for h in self.allowed_hosts):
            raise ValueError(f"serve.allowed_hosts must be a list of host names (e.g. [my.host]), got "
                             f"{self.allowed_hosts!r}")
        positive("header_timeout_s", integer=False)
        positive("target_latency_ms", integer=False)
        if not str(self.default_prompt).strip():
            raise ValueError("serve.default_prompt is empty")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("serve.ssl_keyfile needs serve.ssl_certfile (the certificate, PEM)")
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise ValueError(f"serve.{name}={path!r}: no such file")
        from ..configs import CONF_DIR
        names = sorted(p.stem for p in (CONF_DIR / "vae").glob("*.yaml"))
        if self.taehv_vae not in names:   # the VAE a client's "taehv" switch restarts its stream with
            raise ValueError(f"serve.taehv_vae={self.taehv_vae!r}: not a VAE config; choose one of {names} "
                             f"(a tiny decoder: taehv, lighttae, or their _tiny / _full forms)")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def exposure_warning(self) -> Optional[str]:
        """What to say when listening beyond loopback (None on loopback)."""
        if self.loopback:
            return None
        msg = (f"listening on {self.host}: anyone who can reach this machine on port {self.port} can use the model "
               f"(serve.host=127.0.0.1 keeps it local)")
        if not self.tls:
            msg += ("; browsers give a webcam only to https pages (or localhost): for a remote webcam set "
                    "serve.ssl_certfile=<cert.pem> serve.ssl_keyfile=<key.pem>")
        if not self.allowed_hosts:
            msg += ("; pages reach it by IP address only: name the host names it is reached by in "
                    "serve.allowed_hosts")
        return msg

    def host_allowed(self, host_header: Optional[str]) -> bool:
        """The Host header names this server (a DNS-rebinding page names its own domain): an IP address (the
        address a client connected to), localhost, or a name in ``serve.allowed_hosts`` ("*" = any)."""
        if "*" in self.allowed_hosts:
            return True
        name = host_of(host_header)
        if name is None:
            return False
        if name == "localhost" or name in (h.lower() for h in self.allowed_hosts):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK


def host_of(host_header: Optional[str]) -> Optional[str]:
    """The host name of a Host header ("name:port", "[::1]:port"), lower case; None if malformed."""
    if not host_header:
        return None
    h = host_header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else None
    if h.count(":") > 1:        # a bare IPv6 address
        return h
    return h.rsplit(":", 1)[0] if ":" in h else h
