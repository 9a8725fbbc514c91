"""The process's named CUDA streams: the driver's stage lanes and the VAE graphs' capture stream.

A stream is made once per (device, name) and shared by every pipeline the process builds, one after another.
cuBLAS keeps a workspace (tens of MiB on Hopper) for each stream a matmul has run on, until the process ends;
with fresh streams per pipeline, every rebuilt pipeline (``rebuild_pipeline``, the server's engine switch, a
sweep's runs) would leave those workspaces behind.
"""
from __future__ import annotations

import torch

_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}


def named_stream(device: torch.device | str | int, name: str) -> torch.cuda.Stream:
    """The process's stream called ``name`` on CUDA ``device`` (made on first use)."""
    index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if index.type != "cuda":
        raise ValueError(f"named_stream: {name!r} asked for on {index}; only CUDA devices have streams")
    key = (torch.cuda.current_device() if index.index is None else index.index, name)
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = torch.cuda.Stream(device=key[0])
    return s
