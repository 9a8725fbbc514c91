"""sdv2_lab: streaming video diffusion with a causal Wan2.1 DiT, and the harness that measures it."""
import os as _os

# Nothing in this package may wait on a network: weights come from local files only.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("WANDB_MODE", "offline")

__version__ = "0.1.0"
