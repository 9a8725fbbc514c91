"""Where the model runs: a ``Placement`` names what this process holds — the whole model (``single``,
``single-wo``), or one ``pipe`` stage: its blocks, the embedding on the first stage and the head on the last, the
VAE on the first and last, the text encoder on the first. ``build.py`` builds exactly what it names. Also the
pipe settings read from the config (stages, devices, the first split, the stage options), checked before any
rank starts (``check_pipe``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..backbones.checkpoints import stage_parts
from ..flops import flops_per_output_frame
from ..schema import PipeMode
from ..settings import backbone_config, pipeline_config, switch
from ..stream.schedule import FlowMatchSchedule
from . import balance
from .context import PipeContext, StagePosition, current
from .stage import PipeOptions, PipeStage

log = logging.getLogger(__name__)


def pipe_mode(cfg: DictConfig) -> PipeMode:
    """``cfg.mode`` as its schema (``schema.PipeMode``: every default there, once); a key it lacks is named."""
    data = OmegaConf.to_container(cfg.mode, resolve=True)
    known = {f.name for f in fields(PipeMode)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"mode.{unknown[0]} is not a pipe setting; valid: {', '.join(sorted(known))}")
    return PipeMode(**data)


def pipe_world(cfg: DictConfig) -> int:
    """Stages asked for: ``mode.gpu_ids`` (their count), else ``num_gpus`` (top level), else
    ``mode.num_gpus``; 1 outside mode=pipe."""
    if cfg.mode.name != "pipe":
        return 1
    m = pipe_mode(cfg)
    if m.gpu_ids:
        return len(m.gpu_ids)
    n = cfg.get("num_gpus") or m.num_gpus or 1
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_gpus={n!r}: expected a positive integer (pipeline stages)")
    return n


def pipe_devices(cfg: DictConfig) -> list[str]:
    """One device per stage: cuda:<id> for each GPU id (or 0..N-1), or cpu N times (gloo, for tests)."""
    world = pipe_world(cfg)
    device = str(cfg.device)
    if not device.startswith("cuda"):
        return ["cpu"] * world
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device} was asked for but CUDA is not available on this machine (torch "
                           f"{torch.__version__}); use device=cpu (mode=pipe then runs its stages on the CPU)")
    ids = list(pipe_mode(cfg).gpu_ids or [])
    if not ids:
        base = int(device.split(":")[1]) if ":" in device else 0
        ids = list(range(base, base + world))
    if torch.cuda.is_available() and max(ids) >= torch.cuda.device_count():
        raise RuntimeError(f"mode=pipe needs GPUs {ids}, this machine has {torch.cuda.device_count()} "
                           f"(num_gpus / mode.gpu_ids)")
    return [f"cuda:{i}" for i in ids]


def options(cfg: DictConfig) -> PipeOptions:
    p = pipe_mode(cfg)
    debug = p.debug or {}
    return PipeOptions(schedule_block=bool(p.schedule_block), tolerance=float(p.tolerance),
                       balance_every=int(p.balance_every), max_ahead=int(p.max_ahead), depth=int(p.depth),
                       rebalance_at={int(k): list(v) for k, v in (debug.get("rebalance_at") or {}).items()},
                       fail=debug.get("fail"), slow=debug.get("slow"), stall=debug.get("stall"),
                       cuda_graph=switch(cfg, "cuda_graph"),
                       emulate_graphs=bool(debug.get("emulate_graphs", False)))


def vae_blocks(cfg: DictConfig, steps: int) -> tuple[float, float]:
    """The VAE's encode and decode time per chunk in block-times (for the first split): from
    ``mode.vae_blocks``, or estimated from the FLOP model (the VAE runs at about half the DiT's FLOP rate:
    measured on H100/H200, ~20% vs ~45% of peak). The block scheduler corrects it from measurements."""
    given = pipe_mode(cfg).vae_blocks
    if given not in (None, "auto"):
        enc, dec = (float(v) for v in given)
        return enc, dec
    bcfg = backbone_config(cfg)
    try:
        f = flops_per_output_frame(bcfg, cfg.height, cfg.width, steps, int(cfg.num_kv_cache),
                                   vae=OmegaConf.to_container(cfg.vae, resolve=True))
    except (ValueError, TypeError):
        return 0.0, 0.0
    per_block = f.dit / bcfg.num_layers
    return 2.0 * f.vae_encode / per_block, 2.0 * f.vae_decode / per_block


def initial_ranges(cfg: DictConfig, world: int, num_layers: int, steps: int) -> balance.Ranges:
    split = pipe_mode(cfg).split
    if split:
        counts = list(split)
        if len(counts) != world:
            raise ValueError(f"mode.split={counts} has {len(counts)} entries for {world} stages")
        return balance.check_ranges(balance.ranges_of(counts), num_layers)
    enc, dec = vae_blocks(cfg, steps)
    return balance.default_split(num_layers, world, enc, dec)


def check_precision(cfg: DictConfig) -> None:
    if cfg.get("dit_precision", "bf16") != "bf16":
        raise ValueError(f"mode=pipe runs dit_precision=bf16 (the model dtype); {cfg.dit_precision} is not "
                         f"supported with pipe yet")


def check_pipe(cfg: DictConfig) -> None:
    """What the launcher checks before any rank starts (each would fail alike, in its own process): the devices,
    the stages against the backbone's blocks, the split, the precision."""
    world = pipe_world(cfg)
    pipe_devices(cfg)
    check_precision(cfg)
    bcfg = backbone_config(cfg)
    if world > bcfg.num_layers:
        raise ValueError(f"mode=pipe with {world} stages needs at least {world} blocks; backbone "
                         f"{bcfg.name} has {bcfg.num_layers} (fewer stages: num_gpus=, or mode.gpu_ids=)")
    initial_ranges(cfg, world, bcfg.num_layers, len(pipeline_config(cfg).step_list))


@dataclass(frozen=True)
class Placement(StagePosition):
    """What this process holds of the model. ``single``: everything (one stage of all blocks, no context)."""
    world: int
    rank: int
    ranges: balance.Ranges          # blocks [first, end) of every stage
    num_layers: int
    ctx: Optional[PipeContext] = None
    pipe: bool = False              # a pipe stage (its executor is a PipeStage), even a pipe of one stage

    @property
    def layers(self) -> tuple[int, int]:
        return tuple(self.ranges[self.rank])

    @property
    def parts(self) -> Optional[list[str]]:
        """The DiT's parts to read from the weights (None: all of them)."""
        if not self.pipe:
            return None
        return stage_parts(self.num_layers, *self.layers, embed=self.first, head=self.last)

    @property
    def holds_vae(self) -> bool:
        return self.first or self.last   # the first stage encodes, the last decodes

    @property
    def holds_text_encoder(self) -> bool:
        return self.first

    @property
    def writes_output(self) -> bool:
        """The process that writes files and prints tables: the last stage sees the decoded frames."""
        return self.last


def placement_of(cfg: DictConfig) -> Placement:
    """This process's placement: the whole model, or (``mode=pipe``) this rank's stage."""
    bcfg = backbone_config(cfg)
    if cfg.mode.name != "pipe":
        if (cfg.get("num_gpus") or 1) != 1:
            raise ValueError(f"mode={cfg.mode.name} runs on one GPU, num_gpus={cfg.num_gpus} was given; several "
                             f"GPUs per stream is mode=pipe (e.g. sdv2 eval -m mode=pipe num_gpus=1,2,4)")
        return Placement(1, 0, [(0, bcfg.num_layers)], bcfg.num_layers)
    ctx = current()
    world = pipe_world(cfg)
    if ctx is None and world > 1:
        raise RuntimeError(
            f"mode=pipe with {world} stages runs one process per GPU: `sdv2 run` / `sdv2 eval` / "
            f"run_video_to_video(mode='pipe') / ./run_v2v.sh pipe launch them, or run under torchrun: "
            f"python -m torch.distributed.run --nproc_per_node={world} -m sdv2_lab.torchrun run <overrides>. "
            f"build_pipeline itself builds one stage, inside a launched rank (num_gpus=1: the whole model)")
    if ctx is not None and ctx.world != world:
        log.info("pipe: the job has %d ranks (num_gpus says %d): %d stages", ctx.world, world, ctx.world)
        world = ctx.world
    check_precision(cfg)
    if world > bcfg.num_layers:
        raise ValueError(f"mode=pipe with {world} stages needs at least {world} blocks; backbone "
                         f"{bcfg.name} has {bcfg.num_layers} (fewer stages: num_gpus=, or mode.gpu_ids=)")
    ranges = initial_ranges(cfg, world, bcfg.num_layers, len(pipeline_config(cfg).step_list))
    return Placement(world, ctx.rank if ctx is not None else 0, ranges, bcfg.num_layers, ctx=ctx, pipe=True)


def writes_output() -> bool:
    """Whether this process writes files and prints tables: any process outside a pipe job, and a job's last
    rank (the one predicate every front end asks)."""
    ctx = current()
    return ctx is None or ctx.last


def pipe_stage(place: Placement, dit, vae, pcfg, cfg: DictConfig, device: torch.device, dtype) -> PipeStage:
    """The executor of a pipe stage: its blocks' share of the KV cache, the links to its neighbours. A stage's
    VAE is warmed up here (the pipeline's own warm-up is a single-process stream; ranks run in lockstep)."""
    if vae is not None and device.type == "cuda" and hasattr(vae, "warmup"):
        log.info("VAE warm-up at %dx%d: %.1f s", cfg.height, cfg.width, vae.warmup(cfg.height, cfg.width))
    rows = pcfg.max_streams * len(pcfg.step_list)
    cache = dit.new_cache(rows, pcfg.height, pcfg.width, pcfg.num_kv_cache, pcfg.sink_frames,
                          pcfg.adapt_sink_threshold, dtype=dtype, device=device, layers=place.layers,
                          kv_dtype=pcfg.kv_cache_dtype, sink_ema=pcfg.sink_ema,
                          key_bias=pcfg.kv_attention_bias)
    stage = PipeStage(dit, cache, FlowMatchSchedule(pcfg.timestep_shift), ctx=place.ctx, ranges=place.ranges,
                      options=options(cfg))
    if place.ctx is not None:
        place.ctx.health.role = stage.role
    log.info("pipe stage %d/%d on %s: %s (split %s)", place.rank, place.world, device, stage.role,
             balance.counts_of(place.ranges))
    return stage
