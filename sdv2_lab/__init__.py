"""sdv2_lab: streaming video diffusion with a causal Wan2.1 DiT, and the harness that measures it."""
import os as _os

# Nothing in this package may wait on a network: weights come from local files only.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("WANDB_MODE", "offline")

__version__ = "0.1.0"

# The seed's API (``from streamdiffusionv2 import ...`` becomes ``from sdv2_lab import ...``), imported on first
# use so that ``import sdv2_lab`` stays light.
_API = ("StreamDiffusionV2Pipeline", "VideoChunk", "EncodedChunk", "DenoisedChunk", "export_video", "load_video",
        "run_video_to_video", "StreamVideoToVideo")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'sdv2_lab' has no attribute {name!r}")
