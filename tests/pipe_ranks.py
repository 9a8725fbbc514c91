"""Rank functions for the pipe tests (importable by spawned processes): a tiny DiT split into stages, the
stand-in VAE of the engine tests, the hashed text encoder."""
from __future__ import annotations

import torch

from sdv2_lab.backbones.checkpoints import load_backbone, stage_parts
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.parallel import balance
from sdv2_lab.parallel.context import current
from sdv2_lab.parallel.stage import PipeOptions, PipeStage
from sdv2_lab.stream.clips import stream_clip, stream_clips
from sdv2_lab.stream.config import PipelineConfig
from sdv2_lab.stream.pipeline import StreamPipeline
from stand_in_vae import PoolVAE


def text_encoder():
    from sdv2_lab.text.hashed import HashedTextEncoder   # (the text package imports transformers: ~5 s)
    return HashedTextEncoder()


H, W = 64, 96           # 24 tokens per latent frame: GEMMs take the same path per row as in a whole job
TINY6 = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=6)


def pipeline_config(steps: int, streams: int = 1, refresh: int = 50) -> PipelineConfig:
    return PipelineConfig(height=H, width=W, mode="single", denoising_steps=[700, 500, 400, 200][:steps],
                          num_kv_cache=6, sink_frames=3, adapt_sink_threshold=0.2, position_refresh_frames=refresh,
                          max_streams=streams)


def single(steps: int, weights="dummy", streams: int = 1) -> StreamPipeline:
    dit = load_backbone(WanDiTConfig(name="tiny6", **TINY6), weights, dtype=torch.float32, seed=0)
    return StreamPipeline(dit, PoolVAE(), text_encoder(), pipeline_config(steps, streams), device="cpu",
                          dtype=torch.float32)


def stage(steps: int, counts: list, weights="dummy", streams: int = 1, options=None) -> StreamPipeline:
    ctx = current()
    world, rank = (ctx.world, ctx.rank) if ctx is not None else (1, 0)
    ranges = balance.ranges_of(counts)
    first, end = ranges[rank]
    cfg = WanDiTConfig(name="tiny6", **TINY6)
    dit = load_backbone(cfg, weights, dtype=torch.float32, seed=0,
                        parts=stage_parts(cfg.num_layers, first, end, embed=rank == 0, head=rank == world - 1))
    pcfg = pipeline_config(steps, streams)
    pcfg.mode = "pipe"
    cache = dit.new_cache(streams * steps, H, W, 6, 3, 0.2, dtype=torch.float32, layers=(first, end))
    ex = PipeStage(dit, cache, ctx=ctx, ranges=ranges, options=PipeOptions(**(options or {})))
    if ctx is not None:
        ctx.health.role = ex.role
    vae = PoolVAE() if rank in (0, world - 1) else None
    pipe = StreamPipeline(dit, vae, text_encoder() if rank == 0 else None, pcfg, device="cpu",
                          dtype=torch.float32, executor=ex)
    ex.attach(pipe.driver)
    return pipe


def clips(specs):
    return [synthetic_clip(1 + 4 * chunks, H, W, seed=cs, velocity=(0.7 + cs, 2.3))[0] for chunks, cs in specs]


def run_streams(pipe, specs, prompts, seeds):
    r = stream_clips(pipe, clips(specs), prompts, seeds=seeds, keep_output=True)
    return r.outputs, r.per_stream


def rank_streams(steps, counts, specs, prompts, seeds, weights="dummy", options=None):
    """On every rank: the streams through this rank's stage; returns (outputs, stats, rebalances)."""
    pipe = stage(steps, counts, weights, len(specs), options)
    outs, stats = run_streams(pipe, specs, prompts, seeds)
    return outs, stats, pipe.executor.rebalances, pipe.executor.ranges


def rank_clip(steps, counts, chunks, options=None):
    pipe = stage(steps, counts, options=options)
    out, stats = stream_clip(pipe, clips([(chunks, 0)])[0], "a watercolor street", seed=7)
    return out, stats
