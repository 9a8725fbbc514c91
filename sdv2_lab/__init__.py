"""sdv2_lab: streaming video diffusion with a causal Wan2.1 DiT, and the harness that measures it.

Importing it changes nothing in the caller's environment. Nothing here waits on a network all the same: the
loaders read local files only (``local_files_only=True``), and the command lines set the hubs' offline
defaults for themselves (``sdv2_lab/entry.py``)."""

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
