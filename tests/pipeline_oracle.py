"""Run the reference's own offline loops (``streamv2v.inference`` / ``inference_wo_batch``) on tiny parts.

The reference's runners normally load every model from disk; here they are assembled around the tiny
reference DiT, a test VAE (``PoolVAE``, below) and a fixed prompt embedding, and the final video is taken
from the ``export_to_video`` call. The Wan VAE's own parity is tested in tests/test_wan_vae.py; the point
here is the pipeline logic (chunking, noise controller, stream batch, RNG order, flush).
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from dit_oracle import build_reference
from stand_in_vae import PoolVAE as StandInVAE


class PoolVAE(StandInVAE):
    """The stand-in VAE (``stand_in_vae.py``) speaking the reference's wrapper interface too."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.model = types.SimpleNamespace(first_encode=True, first_decode=True)  # the reference's flags

    # --- the reference's wrapper interface
    def stream_encode(self, video):
        st = self._ref_state()
        st["first_encode"] = self.model.first_encode
        self.model.first_encode = False
        return self.encode(st, video).transpose(1, 2)  # [B, 16, F, h, w] as the Wan wrapper returns

    def stream_decode_to_pixel(self, latent):
        st = self._ref_state()
        st["first_decode"] = self.model.first_decode
        self.model.first_decode = False
        return self.decode(st, latent).float()

    def _ref_state(self):
        if not hasattr(self, "_st"):
            self._st = self.new_state()
        return self._st


def build_reference_runner(mode: str, ref_dit, vae, prompt_embeds, steps, num_kv, sink, threshold, height, width,
                           dtype):
    from models.wan.causal_stream_inference import CausalStreamInferencePipeline
    from models.wan.flow_match import FlowMatchScheduler
    from models.wan.wan_wrapper import CausalWanDiffusionWrapper

    gen = CausalWanDiffusionWrapper.__new__(CausalWanDiffusionWrapper)
    nn.Module.__init__(gen)
    gen.model = ref_dit
    gen.scheduler = FlowMatchScheduler(shift=8.0, sigma_min=0.0, extra_one_step=True)
    gen.scheduler.set_timesteps(1000, training=True)
    gen.uniform_timestep, gen.seq_len = False, 32760

    cfg = OmegaConf.create(dict(t2v=False, num_kv_cache=num_kv, num_sink_tokens=sink, adapt_sink_threshold=threshold,
                                num_frame_per_block=1, warp_denoising_step=False, height=height, width=width,
                                denoising_step_list=[700, 500, 400, 200][:steps] + [0], profile=False))
    p = CausalStreamInferencePipeline.__new__(CausalStreamInferencePipeline)
    nn.Module.__init__(p)
    p.device, p.generator, p.vae, p.args = torch.device("cpu"), gen, vae, cfg
    p.text_encoder = lambda text_prompts: {"prompt_embeds": prompt_embeds.clone()}
    p._init_denoising_step_list(cfg, "cpu")
    p.num_transformer_blocks, p.num_heads = len(ref_dit.blocks), ref_dit.num_heads
    p.height, p.width = height // 16 * 2, width // 16 * 2
    p.frame_seq_length = (height // 16) * (width // 16)
    p.num_kv_cache, p.kv_cache_length = num_kv, p.frame_seq_length * num_kv
    p.num_sink_tokens, p.adapt_sink_threshold = sink, threshold
    p.conditional_dict = p.kv_cache1 = p.kv_cache2 = p.hidden_states = p.block_x = None
    p.num_frame_per_block = 1
    for blk in ref_dit.blocks:
        blk.self_attn.evict_idx = None

    if mode == "single":
        from streamv2v.inference import SingleGPUInferencePipeline as Runner
    else:
        from streamv2v.inference_wo_batch import SingleGPUInferencePipeline as Runner

    class DtypeRunner(Runner):  # the reference hard-codes bf16 caches here; follow the model's dtype instead
        def prepare_pipeline(self, text_prompts, noise, current_start, current_end, **kw):
            return self.pipeline.prepare(text_prompts=text_prompts, device=self.device, dtype=dtype,
                                         block_mode="input", noise=noise, current_start=current_start,
                                         current_end=current_end, **kw)

    r = DtypeRunner.__new__(DtypeRunner)
    r.config, r.device, r.pipeline = cfg, torch.device("cpu"), p
    import logging
    r.logger = logging.getLogger("reference-runner")
    r.t_dit = r.t_total = 100.0
    r.processed, r.processed_offset, r.base_chunk_size, r.t_refresh = 0, 3, 4, 50
    r.t2v, r.profile = False, False
    r.encode_fps_list, r.decode_fps_list = [], []
    return r


def run_reference(monkeypatch, mode, video, runner, steps, noise_scale):
    """Run the reference's run_inference on video [1, 3, T, H, W]; returns the exported [T, H, W, 3] array."""
    import streamv2v.inference as single
    import streamv2v.inference_wo_batch as wo
    captured = {}
    module = single if mode == "single" else wo
    monkeypatch.setattr(module, "export_to_video", lambda v, path, fps=16: captured.setdefault("video", v))
    chunk = 4
    num_chunks = (video.shape[2] - 1) // chunk
    kwargs = dict(input_video_original=video, prompts=["p"], num_chunks=num_chunks, chunk_size=chunk,
                  noise_scale=noise_scale, output_folder=str(monkeypatch._tmp if hasattr(monkeypatch, "_tmp") else "/tmp/ref_out"),
                  fps=16, num_steps=steps)
    if mode == "single":
        kwargs["target_fps"] = None
    import inspect
    accepted = inspect.signature(runner.run_inference).parameters
    with torch.no_grad():
        runner.run_inference(**{k: v for k, v in kwargs.items() if k in accepted})
    return captured["video"]


def tiny_reference_dit(seed=0):
    return build_reference(seed=seed)
