"""Streaming VAEs: the Wan2.1 VAE and the TAEHV tiny decoder behind one interface (``base.StreamingVAE``)."""
from .base import StreamingVAE, build_vae, register_vae  # noqa: F401
from . import builders  # noqa: F401,E402  (registers the VAEs)
