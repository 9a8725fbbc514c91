"""The process-group side of a ``pipe`` run: who this rank is, its device, its groups and its health.

One ``PipeContext`` per worker process, made by the launcher (``launch.py``: spawned processes or torchrun)
before anything is built; ``build_pipeline`` asks ``current()`` which stage to build. Groups:

* ``world`` (NCCL on CUDA, gloo on CPU and for host-staged transport): prompt broadcasts, block moves;
* ``links[r]`` (same backend, ranks {r, r+1}): activations r -> r+1; a group per link, so that a receive
  posted ahead from r-1 never holds up a send to r+1 on one NCCL stream;
* ``ret`` (same backend, ranks {0, W-1}): re-noised latents from the last stage back to the first;
* ``ctl`` (gloo, every rank): small host-side values (stage times for the block scheduler, run statistics),
  so that they never queue behind activations on a GPU stream.

Transport (``mode.transport``): ``nccl`` between GPUs; ``host`` stages GPU tensors through pinned host memory
over gloo (NCCL refuses two ranks on one GPU: this is how ``mode.gpu_ids=[0,0]`` checks the GPU path of a
multi-stage job on one GPU; slow, never a measurement of pipe speed); ``auto``: host when GPUs repeat.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..schema import STALL_TIMEOUT_S
from .health import Health

log = logging.getLogger(__name__)

_CURRENT: Optional["PipeContext"] = None


class StagePosition:
    """Where a rank stands in the pipe: the first stage encodes, the last decodes and writes."""
    rank: int
    world: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1


@dataclass
class PipeContext(StagePosition):
    rank: int
    world: int
    device: torch.device
    health: Health
    world_group: object = None
    link_groups: list = field(default_factory=list)
    ret_group: object = None
    ctl_group: object = None
    backend: str = "gloo"
    staged: bool = False              # GPU tensors travel through host memory (transport=host)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def on_close(self, fn: Callable[[], None]) -> None:
        self.closers.append(fn)

    def close(self) -> None:
        """A finished rank: drain what is in flight, meet the others, tear the groups down (no hang at exit)."""
        global _CURRENT
        self.health.doing("finishing (draining sends and receives)")
        for fn in reversed(self.closers):
            fn()
        self.closers.clear()
        if dist.is_initialized():
            self.health.doing("finishing (barrier with every rank)")
            work = dist.barrier(group=self.ctl_group, async_op=True)
            from .comm import Op, wait_work
            wait_work(Op(work, True), self.health, (self.rank + 1) % self.world, "for every rank at the end")
            dist.destroy_process_group()
        self.health.close(finished=True)
        _CURRENT = None


def current() -> Optional[PipeContext]:
    """This process's pipe context, or None outside a pipe worker."""
    return _CURRENT


def resolve_transport(transport: str, devices: list[str]) -> str:
    """``auto`` -> ``host`` when a GPU serves several ranks (NCCL refuses that), else ``nccl``."""
    if transport not in ("auto", "nccl", "host"):
        raise ValueError(f"mode.transport={transport!r}: expected auto, nccl or host")
    gpus = [str(torch.device(d)) for d in devices if torch.device(d).type == "cuda"]
    if transport == "auto":
        return "host" if len(set(gpus)) < len(gpus) else "nccl"
    if transport == "nccl" and len(set(gpus)) < len(gpus):
        raise ValueError(f"mode.transport=nccl with devices {devices}: NCCL refuses two ranks on one GPU; use "
                         f"transport=host (or auto) to run several stages on one GPU")
    return transport


def init(rank: int, world: int, device: str | torch.device, store, *, timeout_s: float = 60.0, role: str = "",
         health_store=None, transport: str = "nccl", stall_timeout_s: Optional[float] = None,
         quiet: bool = False) -> PipeContext:
    """Join the job: process groups over ``store`` (a TCPStore client), the health monitor, the device.
    ``timeout_s``: silence (no heartbeat) that ends the job; ``stall_timeout_s``: a wait on a live peer that
    long ends it (a slow peer is not a dead one: a 14B stage build takes minutes)."""
    global _CURRENT
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" and transport != "host" else "gloo"
    stall = float(stall_timeout_s if stall_timeout_s is not None else STALL_TIMEOUT_S)
    health = Health(health_store, rank, world, role or f"rank {rank}", timeout_s, stall_timeout_s=stall, quiet=quiet)
    # the groups' own timeout sits beyond ours (silence: the heartbeats; no progress: the stall timeout), so that a
    # transfer waiting on a slow but live peer is never cut by the backend
    timeout = datetime.timedelta(seconds=max(timeout_s * 2, stall + 60))
    health.doing("joining the process group")
    kwargs = dict(device_id=device) if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timeout, **kwargs)
    links = [dist.new_group([r, r + 1], backend=backend) for r in range(world - 1)]   # every rank makes each
    ret = dist.new_group([0, world - 1], backend=backend) if world > 1 else None
    ctl = dist.new_group(list(range(world)), backend="gloo") if backend != "gloo" else dist.group.WORLD
    _CURRENT = PipeContext(rank, world, device, health, dist.group.WORLD, links, ret, ctl, backend,
                           staged=device.type == "cuda" and backend == "gloo")
    health.doing("building its stage")
    return _CURRENT


def init_from_env(timeout_s: float = 60.0, stall_timeout_s: Optional[float] = None) -> PipeContext:
    """Under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpus = os.environ.get("SDV2_PIPE_DEVICES")
    if gpus:
        device = gpus.split(",")[local]
    else:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=300))
    transport = os.environ.get("SDV2_PIPE_TRANSPORT", "auto")
    if transport == "auto":   # every rank decides alike: from the device list when given, else one GPU per rank
        transport = resolve_transport("auto", gpus.split(",")[:world]) if gpus else "nccl"
    return init(rank, world, device, store, timeout_s=timeout_s, health_store=dist.PrefixStore("sdv2", store),
                transport=transport, stall_timeout_s=stall_timeout_s)
