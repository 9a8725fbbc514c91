"""Structured configs: dataclasses that are the schema of a ``conf/`` group. Each holds every key of its group
with its one default; the group's YAML only names the schema in its defaults list and overrides or documents
(Hydra then refuses an unknown key and a value of the wrong type at composition). ``configs.py`` registers them
with Hydra's ConfigStore; code reads a group through its dataclass (``parallel.placement.pipe_mode``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

# a wait on a live peer (fresh heartbeat) is slowness, not a failure, until this (a 14B stage build takes minutes)
STALL_TIMEOUT_S = 1800.0


@dataclass
class PipeMode:
    """``mode=pipe`` (``conf/mode/pipe.yaml`` says what each key does)."""
    name: str = "pipe"
    num_gpus: int = 2                      # stages (processes); the top-level num_gpus overrides it
    gpu_ids: Optional[List[int]] = None    # explicit GPU ids (then num_gpus is their count)
    split: Optional[List[int]] = None      # blocks per stage; None = balanced with the VAE's cost
    vae_blocks: Any = "auto"               # [encode, decode] cost in blocks for the first split, or auto
    schedule_block: bool = False           # the block scheduler
    tolerance: float = 0.05                # ... moves blocks until the slowest stage is within this of the mean
    balance_every: int = 8                 # jobs per measurement window
    timeout_s: float = 60.0                # silence (no heartbeat) that ends the job
    stall_timeout_s: Optional[float] = STALL_TIMEOUT_S   # a live peer making no progress that long ends it
    max_ahead: int = 3                     # GPU: jobs the host may queue ahead of the device
    depth: int = 2                         # messages in flight per link
    transport: str = "auto"                # nccl | host | auto
    threads: Optional[int] = None          # CPU runs: torch threads per rank (None = cores / ranks)
    debug: dict = field(default_factory=dict)   # tests only: rebalance_at, fail, slow, stall, emulate_graphs


SCHEMAS = {("mode", "pipe_schema"): PipeMode}
