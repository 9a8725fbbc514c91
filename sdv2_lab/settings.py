"""The composed Hydra config read once, into the typed configs and choices the build uses: the device and dtype,
the backbone's config object, the pipeline's ``PipelineConfig``, the fast paths' ``auto`` resolved for the device.
Nothing here builds a model; ``build.py`` (the build sequence), ``preflight.py`` (checks before any model) and the
pipe placement read the config through these functions only."""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from .backbones.wan_dit import WanDiTConfig
from .stream.noise_controller import NoiseControllerConfig
from .stream.config import PipelineConfig


def resolve_device(spec: str) -> torch.device:
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec} was asked for but CUDA is not available on this machine "
                           f"(torch {torch.__version__}); use device=cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={spec}: only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(device)
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}[spec]
    except KeyError:
        raise ValueError(f"dtype={spec!r}: expected auto, bfloat16, float32 or float16") from None


# A backbone entry's keys that are not sizes: where its weights come from and how its file is read
# (``checkpoints.load_backbone``), its source and licence (docs/backbones.md).
PLUGIN_KEYS = ("checkpoint", "recipe", "source", "license", "paper_fps")


def backbone_config(cfg: DictConfig) -> WanDiTConfig:
    """The backbone's config object: the class named by ``_target_`` in ``conf/backbone/<name>.yaml`` (a new
    backbone is a new config file pointing at its config class), filled with the file's other keys."""
    from hydra.utils import get_class
    data = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items()
            if not k.startswith("_") and k not in PLUGIN_KEYS}
    config_class = get_class(cfg.backbone.get("_target_", f"{WanDiTConfig.__module__}.WanDiTConfig"))
    return config_class(attention=cfg.attention.name, **data)


def most_steps(cfg: DictConfig) -> int:
    """The most denoising steps this recipe runs: its step list's length, and at most 4 in a stream batch (one
    KV row per step: the reference's --step); Rolling Forcing's window takes its whole list."""
    table = len(cfg.denoising_step_list)
    return table if cfg.get("rolling_window") else min(4, table)


def denoising_steps(cfg: DictConfig) -> list[int]:
    n, table, most = cfg.steps, list(cfg.denoising_step_list), most_steps(cfg)
    if not isinstance(n, int) or not 1 <= n <= most:
        raise ValueError(f"steps={n!r}: expected an integer from 1 to {most}")
    return table[:n]


def _first_chunk_steps(cfg: DictConfig):
    steps = cfg.first_chunk_steps
    return None if steps is None else [int(t) for t in steps]


def on_cuda(cfg: DictConfig) -> bool:
    return str(cfg.device).startswith("cuda")


def switch(cfg: DictConfig, key: str, default="auto") -> bool:
    """A fast path's ``auto | true | false`` key, resolved for the run's device: auto = on for CUDA, off on a
    CPU (where CUDA graphs and CUDA streams do not exist)."""
    value = OmegaConf.select(cfg, key, default=default)
    if value == "auto" or value is None:
        return on_cuda(cfg)
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key}={value!r}: expected auto, true or false")


def compile_kernels(cfg: DictConfig) -> bool:
    """``compile_kernels`` resolved: auto = on for CUDA where Triton (torch.compile's GPU code generator) is
    installed, off on a CPU (eager there is the reference-exact path the tests compare)."""
    if not switch(cfg, "compile_kernels", default=False):
        return False
    if cfg.get("compile_kernels") not in ("auto", None):
        return True   # asked for by name
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def vae_accelerate(cfg: DictConfig) -> str:
    """``vae.accelerate`` resolved: auto = cuda_graph on CUDA, none on a CPU."""
    value = cfg.vae.get("accelerate", "none")
    if value == "auto":
        return "cuda_graph" if on_cuda(cfg) else "none"
    return value or "none"


def fast_paths(cfg: DictConfig) -> dict:
    """What runs, as booleans and names (the log line and results rows read this, not the raw ``auto``)."""
    from .vae.wan_builder import use_fused
    accelerate = vae_accelerate(cfg)
    fused = "fused" in cfg.vae and cfg.vae.get("encoder", "wan") == "wan" and \
        use_fused(cfg.vae.fused, "cuda" if on_cuda(cfg) else "cpu", accelerate)
    return {"cuda_graph": switch(cfg, "cuda_graph"), "compile_kernels": compile_kernels(cfg),
            "overlap": switch(cfg, "overlap"),
            "vae_accelerate": accelerate, "vae_fused": bool(fused), "warmup": switch(cfg, "warmup")}


def describe_paths(cfg: DictConfig) -> str:
    p = fast_paths(cfg)
    vae = cfg.vae.name + "".join(f", {x}" for x, on in (("fused", p["vae_fused"]),
                                                        (p["vae_accelerate"].replace("_", " "),
                                                         p["vae_accelerate"] != "none")) if on)
    pc = pipeline_config(cfg)
    kv = {"recache": f", KV recache on a prompt switch{' (global sink)' if pc.kv_recache_global_sink else ''}", "recompute": ", KV recomputed before every chunk",
          "recache+recompute": ", KV recache and per-chunk recompute", None: ""}[pc.kv_rebuild]
    kv += " (its oldest frame re-encoded from pixels)" if pc.kv_rebuild and pc.kv_recompute_reencode else ""
    sink = f", EMA sink ({pc.sink_ema})" if pc.sink_ema else ""
    sink += f", KV attention bias {pc.kv_attention_bias}" if pc.kv_attention_bias < 1 else ""
    sink += f", rolling window of {len(pc.denoising_steps)} blocks" if pc.rolling_window else ""
    sink += f", memory bank of {pc.memory} frames" if pc.memory else ""
    return (f"DiT {'CUDA graph' if p['cuda_graph'] else 'eager'}"
            f"{', compiled elementwise kernels' if p['compile_kernels'] else ''}{kv}{sink}, stages "
            f"{'overlapped on CUDA streams' if p['overlap'] else 'in turn'}, VAE {vae}")


def frame_flops(cfg: DictConfig, *, vae: bool = True):
    """The analytic FLOPs per output video frame of this configuration (``flops.FrameFlops``): its backbone at its
    resolution, with the recipe's forwards per latent frame and attended frames (``PipelineConfig``), and its VAE
    (``vae=False``: DiT only). What every MFU figure divides by."""
    from .flops import flops_per_output_frame
    pc = pipeline_config(cfg)
    spec = OmegaConf.to_container(cfg.vae, resolve=True) if vae else None
    return flops_per_output_frame(backbone_config(cfg), cfg.height, cfg.width, pc.forwards_per_latent_frame,
                                  pc.attended_frames, vae=spec)


def pipeline_config(cfg: DictConfig) -> PipelineConfig:
    return PipelineConfig(
        height=cfg.height, width=cfg.width, mode=cfg.mode.name, denoising_steps=denoising_steps(cfg),
        num_kv_cache=cfg.num_kv_cache, kv_cache_dtype=str(cfg.kv_cache_dtype), sink_frames=cfg.sink_frames,
        adapt_sink_threshold=cfg.adapt_sink_threshold, sink_ema=float(cfg.sink_ema),
        kv_attention_bias=float(cfg.kv_attention_bias),
        memory_frames=cfg.memory_frames, memory_record_interval=cfg.memory_record_interval,
        frames_per_block=cfg.frames_per_block, rolling_window=bool(cfg.get("rolling_window", False)),
        first_chunk_latents=cfg.first_chunk_latents,
        first_chunk_steps=_first_chunk_steps(cfg), timestep_shift=float(cfg.timestep_shift),
        warp_denoising_step=bool(cfg.warp_denoising_step), context_pass=bool(cfg.context_pass),
        kv_recache=bool(cfg.kv_recache), kv_recache_global_sink=bool(cfg.kv_recache_global_sink),
        kv_recompute_frames=int(cfg.kv_recompute_frames),
        kv_recompute_reencode=bool(cfg.kv_recompute_reencode),
        noise=NoiseControllerConfig(noise_scale=cfg.noise_scale, fixed=cfg.fixed_noise), t2v=cfg.t2v,
        position_refresh_frames=cfg.position_refresh_frames, target_fps=cfg.target_fps,
        cuda_graph=switch(cfg, "cuda_graph"), overlap=switch(cfg, "overlap"), max_streams=int(cfg.streams),
        rope_positions=backbone_config(cfg).rope_max_positions, input_guard=str(cfg.input_guard),
        input_limit=float(cfg.input_limit))


def dit_weights(cfg: DictConfig):
    if cfg.weights.kind == "dummy":
        return "dummy"
    ckpt = cfg.weights.checkpoint
    if not ckpt:
        raise ValueError("weights=real needs weights.checkpoint (a StreamDiffusionV2 model.pt or its folder)")
    return ckpt


def checkpoint_rules(cfg: DictConfig) -> dict:
    """The backbone entry's ``checkpoint:`` block (docs/backbones.md), resolved; {} when it has none."""
    rules = cfg.backbone.get("checkpoint")
    return OmegaConf.to_container(rules, resolve=True) if rules is not None else {}


def dit_load_options(cfg: DictConfig) -> dict:
    """How the backbone entry's file is read (``backbone.checkpoint``): the pickle's container keys in order and
    a LoRA merged at load. Dummy weights take neither (there is no file, and a LoRA on noise means nothing)."""
    if cfg.weights.kind == "dummy":
        return {}
    rules = checkpoint_rules(cfg)
    keys = rules.get("container_keys")
    return {"container_keys": None if keys is None else tuple(keys), "lora": rules.get("lora"),
            "lora_alpha": rules.get("lora_alpha")}


def dit_config(cfg: DictConfig) -> WanDiTConfig:
    """The DiT's config for the build: ``backbone_config``, with the sizes read from the weight file's shapes when
    the entry says ``checkpoint.size_from_checkpoint`` (Krea's one file serves 1.3B and 14B)."""
    config, rules = backbone_config(cfg), checkpoint_rules(cfg)
    if cfg.weights.kind != "dummy" and rules.get("size_from_checkpoint"):
        import dataclasses

        from .backbones.checkpoints import size_from_checkpoint
        config = dataclasses.replace(config, **size_from_checkpoint(dit_weights(cfg), rules.get("container_keys")))
    return config
