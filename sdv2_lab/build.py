"""Config (``conf/``) -> components -> a ready ``StreamPipeline``. The one place that reads Hydra configs and
knows every registry; the models themselves know nothing of Hydra."""
from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .backbones.checkpoints import load_backbone
from .backbones.fp8 import apply_dit_precision
from .backbones.wan_dit import WanDiTConfig
from .stream.noise_controller import NoiseControllerConfig
from .stream.pipeline import PipelineConfig, StreamPipeline

log = logging.getLogger(__name__)

CONF_DIR = Path(os.environ.get("SDV2_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


def compose_config(name: str = "config", overrides: Optional[list[str]] = None) -> DictConfig:
    """Compose a config from ``conf/`` outside of a Hydra app (API, tests, notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"config folder {CONF_DIR} not found (set SDV2_CONF_DIR)")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides or []), return_hydra_config=False)
    return cfg


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


def backbone_config(cfg: DictConfig) -> WanDiTConfig:
    """The backbone's config object: the class named by ``_target_`` in ``conf/backbone/<name>.yaml`` (a new
    backbone is a new config file pointing at its config class), filled with the file's other keys."""
    from hydra.utils import get_class
    data = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items() if not k.startswith("_")}
    config_class = get_class(cfg.backbone.get("_target_", f"{WanDiTConfig.__module__}.WanDiTConfig"))
    return config_class(attention=cfg.attention.name, **data)


def denoising_steps(cfg: DictConfig) -> list[int]:
    n, table = cfg.steps, list(cfg.denoising_step_list)
    if not isinstance(n, int) or not 1 <= n <= min(4, len(table)):
        raise ValueError(f"steps={n!r}: expected an integer from 1 to {min(4, len(table))}")
    return table[:n]


def pipeline_config(cfg: DictConfig) -> PipelineConfig:
    return PipelineConfig(
        height=cfg.height, width=cfg.width, mode=cfg.mode.name, denoising_steps=denoising_steps(cfg),
        num_kv_cache=cfg.num_kv_cache, sink_frames=cfg.sink_frames, adapt_sink_threshold=cfg.adapt_sink_threshold,
        frames_per_block=cfg.frames_per_block,
        noise=NoiseControllerConfig(noise_scale=cfg.noise_scale, fixed=cfg.fixed_noise), t2v=cfg.t2v,
        position_refresh_frames=cfg.position_refresh_frames, target_fps=cfg.target_fps, cuda_graph=cfg.cuda_graph,
        overlap=bool(cfg.get("overlap", False)), max_streams=int(cfg.get("streams", 1)),
        rope_positions=backbone_config(cfg).rope_max_positions, input_guard=str(cfg.get("input_guard", "raise")),
        input_limit=float(cfg.get("input_limit", 1.5)))


def dit_weights(cfg: DictConfig):
    if cfg.weights.kind == "dummy":
        return "dummy"
    ckpt = cfg.weights.checkpoint
    if not ckpt:
        raise ValueError("weights=real needs weights.checkpoint (a StreamDiffusionV2 model.pt or its folder)")
    return ckpt


def build_text_encoder(cfg: DictConfig, device, dtype):
    name = cfg.text_encoder.name
    if name == "hashed":
        from .text.hashed import HashedTextEncoder
        return HashedTextEncoder(dim=cfg.backbone.get("text_dim", 4096))
    from .text import build_text_encoder as build
    return build(cfg.text_encoder, wan_folder=cfg.weights.wan_folder, dummy=cfg.weights.kind == "dummy",
                 device=device, dtype=dtype)


def build_vae(cfg: DictConfig, device, dtype):
    from .vae import build_vae as build
    return build(cfg.vae, wan_folder=cfg.weights.wan_folder, taehv_path=cfg.weights.taehv,
                 dummy=cfg.weights.kind == "dummy", device=device, dtype=dtype)


class _OneDummyWarning(logging.Filter):
    """Holds back the per-part "DUMMY weights" warnings of the loaders while a pipeline is built, so that a run
    says it once (``build_pipeline``), naming the parts."""

    LOADERS = ("sdv2_lab.backbones.checkpoints", "sdv2_lab.vae.checkpoints", "sdv2_lab.text.encoder")

    def __enter__(self):
        names = {n for n in logging.Logger.manager.loggerDict if n.startswith("sdv2_lab.")} | set(self.LOADERS)
        self.loggers = [logging.getLogger(name) for name in sorted(names)]  # made now if not imported yet
        for logger in self.loggers:
            logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and "DUMMY" in str(record.msg))


def dummy_parts(pipe: StreamPipeline) -> list[str]:
    parts = {"DiT": getattr(pipe, "dit", None), "VAE": getattr(pipe, "vae", None),
             "text encoder": getattr(pipe, "text_encoder", None)}
    return [name for name, part in parts.items() if getattr(part, "weights_are_dummy", False)]


def build_pipeline(cfg: DictConfig) -> StreamPipeline:
    with _OneDummyWarning():
        pipe = _build_pipeline(cfg)
    # omegaconf raises and catches inside (a missing key's default): the traceback's frames reach the builder's
    # frame and its locals (the models), a cycle that would keep them on the device after the pipeline is
    # deleted, until some later collection. Collected here, `del pipe` gives the memory back at once.
    gc.collect()
    if pipe.weights_are_dummy:
        log.warning("DUMMY weights (random init) in the %s: the output is noise, timings are real "
                    "(weights=real with the official files: README, 'Real weights')", ", ".join(dummy_parts(pipe)))
    return pipe


def _build_pipeline(cfg: DictConfig) -> StreamPipeline:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    pcfg = pipeline_config(cfg).validate()  # every setting checked before any model is built
    if pcfg.mode == "pipe":  # this process's stage of the pipeline (sdv2_lab/parallel)
        from .parallel.build import build_stage_pipeline
        return build_stage_pipeline(cfg)
    if (cfg.get("num_gpus") or 1) != 1:
        raise ValueError(f"mode={pcfg.mode} runs on one GPU, num_gpus={cfg.num_gpus} was given; several GPUs "
                         f"per stream is mode=pipe (e.g. sdv2 eval -m mode=pipe num_gpus=1,2,4)")
    dit = load_backbone(backbone_config(cfg), dit_weights(cfg), device=device, dtype=dtype, seed=cfg.seed)
    dit = apply_dit_precision(dit, cfg.get("dit_precision", "bf16"))  # after loading: names stay loadable
    if cfg.get("compile_kernels", False):
        dit.use_compiled_kernels(True)
    vae = build_vae(cfg, device, dtype)
    if device.type == "cuda" and hasattr(vae, "warmup"):  # kernel JIT and cuDNN tuning now, not in the first chunk
        log.info("VAE warm-up at %dx%d: %.1f s", cfg.height, cfg.width, vae.warmup(cfg.height, cfg.width))
    text = build_text_encoder(cfg, device, dtype)
    return StreamPipeline(dit, vae, text, pcfg, device=device, dtype=dtype)
