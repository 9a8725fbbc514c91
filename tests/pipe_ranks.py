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

class PoolVAE(torch.nn.Module):
    """The engine tests' stand-in VAE (``pipeline_oracle.PoolVAE``: Wan's frame arithmetic, state between calls),
    without that module's imports of the reference (every spawned rank imports this file)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = torch.nn.Parameter(torch.randn(16, 3, generator=g) * 0.5, requires_grad=False)
        self.dec = torch.nn.Parameter(torch.randn(3, 16, generator=g) * 0.3, requires_grad=False)

    def new_state(self, batch_size=1):
        return {"first_encode": True, "first_decode": True, "prev": None}

    def encode(self, state, video):  # [B, 3, T, H, W] -> [B, F, 16, h, w]
        first, state["first_encode"] = state["first_encode"], False
        groups = [(video[:, :, :1], 1), (video[:, :, 1:], 4)] if first else [(video, 4)]
        lat = []
        for g, k in groups:
            if g.shape[2]:
                b, c, t, h, w = g.shape
                x = g.reshape(b, c, t // k, k, h // 8, 8, w // 8, 8).float().mean(dim=(3, 5, 7))
                lat.append(torch.einsum("oc,bcfhw->bfohw", self.enc.float(), x))
        return torch.cat(lat, dim=1).to(video.dtype)

    def decode(self, state, latents):  # [B, F, 16, h, w] -> [B, T, 3, H, W]
        first, state["first_decode"] = state["first_decode"], False
        x = latents.float()
        if state["prev"] is not None:
            x = x + 0.1 * state["prev"]
        state["prev"] = latents[:, -1:].float()
        px = torch.tanh(torch.einsum("oc,bfchw->bfohw", self.dec.float(), x))
        reps = [1] + [4] * (px.shape[1] - 1) if first else [4] * px.shape[1]
        px = torch.cat([px[:, i:i + 1].expand(-1, r, -1, -1, -1) for i, r in enumerate(reps)], dim=1)
        return px.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4).clamp(-1, 1)


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
