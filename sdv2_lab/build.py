"""Config (``conf/``) -> components -> a ready ``StreamPipeline``. The one place that reads Hydra configs and
knows every registry; the models themselves know nothing of Hydra."""
from __future__ import annotations

import gc
import logging
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .backbones.checkpoints import load_backbone
from .backbones.fp8 import dit_precision_step
from .parallel.placement import pipe_stage, placement_of
from .configs import CONF_DIR, compose_config  # noqa: F401  (defined in configs.py; imported from here too)
from .settings import (backbone_config, describe_paths, dit_config, dit_load_options, dit_weights,  # noqa: F401
                       compile_kernels, pipeline_config, resolve_device, resolve_dtype, switch,
                       vae_accelerate)
from .stream.pipeline import StreamPipeline

log = logging.getLogger(__name__)


def build_text_encoder(cfg: DictConfig, device, dtype):
    from .text import build_text_encoder as build
    return build(cfg.text_encoder, wan_folder=cfg.weights.wan_folder, dummy=cfg.weights.kind == "dummy",
                 device=device, dtype=dtype, text_dim=cfg.backbone.get("text_dim", 4096))


def build_vae(cfg: DictConfig, device, dtype):
    from .vae import build_vae as build
    extra = {"accelerate": vae_accelerate(cfg)} if "accelerate" in cfg.vae else {}
    return build(cfg.vae, wan_folder=cfg.weights.wan_folder, taehv_path=cfg.weights.taehv,
                 dummy=cfg.weights.kind == "dummy", device=device, dtype=dtype, **extra)


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


def dummy_parts(pipe: StreamPipeline, cfg: Optional[DictConfig] = None) -> list[str]:
    parts = {"DiT": getattr(pipe, "dit", None), "VAE": getattr(pipe, "vae", None),
             "text encoder": getattr(pipe, "text_encoder", None)}
    names = [name for name, part in parts.items() if getattr(part, "weights_are_dummy", False)]
    if parts["text encoder"] is None and cfg is not None and pipe.weights_are_dummy and \
            (cfg.weights.kind == "dummy" or cfg.text_encoder.name == "hashed"):
        names.append("text encoder")   # a later pipe stage: the first holds it, made from the same settings
    return names


DUMMY_HINT = "weights=real with the official files: README, 'Real weights'"


def build_pipeline(cfg: DictConfig, *, announce: Optional[Callable[[str], None]] = None,
                   dummy_hint: str = DUMMY_HINT) -> StreamPipeline:
    """Build what ``cfg`` names, warm it up (``warmup``: auto = on CUDA) and say in one line what runs: the fast
    paths, the warm-up's time and whether the weights are dummy. ``announce``: where that line goes (a front end
    that shows it to its user); without one it is logged (INFO, and the dummy weights as a WARNING)."""
    with _OneDummyWarning():
        pipe = _build_pipeline(cfg)
    # omegaconf raises and catches inside (a missing key's default): the traceback's frames reach the builder's
    # frame and its locals (the models), a cycle that would keep them on the device after the pipeline is
    # deleted, until some later collection. Collected here, `del pipe` gives the memory back at once.
    gc.collect()
    return _ready(pipe, cfg, announce, dummy_hint)


# what the DiT and the text encoder are made from: a switch that changes none of these keeps them
DIT_KEYS = ("backbone", "attention", "weights.kind", "weights.checkpoint", "weights.wan_folder", "text_encoder",
            "device", "dtype", "dit_precision", "fp8_kernel", "fp8_granularity", "compile_kernels")
VAE_KEYS = ("vae", "weights.kind", "weights.wan_folder", "weights.taehv", "device", "dtype")


def rebuild_pipeline(pipe: StreamPipeline, old: DictConfig, cfg: DictConfig, *,
                     announce: Optional[Callable[[str], None]] = None, dummy_hint: str = DUMMY_HINT) -> StreamPipeline:
    """``cfg``'s pipeline, made from ``pipe``'s parts where ``cfg`` keeps them: the DiT and the text encoder (the
    same ``DIT_KEYS``) and the VAE (the same ``VAE_KEYS``). The KV cache, scheduler, executor and driver are always
    new, so everything that runs afterwards is what ``cfg`` says. ``pipe`` is closed."""
    def same(keys):
        return all(OmegaConf.select(old, k) == OmegaConf.select(cfg, k) for k in keys)
    keep = same(DIT_KEYS) and pipe.cfg.mode != "pipe" and pipeline_config(cfg).mode != "pipe"
    dit, vae, text, device, dtype = pipe.dit, pipe.vae, pipe.text_encoder, pipe.device, pipe.dtype
    pipe.close()   # its KV cache, graphs and stream states go; the parts kept live on in the new pipeline
    if not keep:
        del dit, vae, text
        return build_pipeline(cfg, announce=announce, dummy_hint=dummy_hint)
    pcfg = pipeline_config(cfg).validate()
    if not same(VAE_KEYS):
        del vae
        with _OneDummyWarning():
            vae = build_vae(cfg, device, dtype)
    new = StreamPipeline(dit, vae, text, pcfg, device=device, dtype=dtype)
    return _ready(new, cfg, announce, dummy_hint)


def _ready(pipe: StreamPipeline, cfg: DictConfig, announce, dummy_hint: str) -> StreamPipeline:
    """Warm ``pipe`` up (``warmup``) and say what runs (see ``build_pipeline``)."""
    if pipe.cfg.mode != "pipe" and switch(cfg, "warmup"):
        pipe.warm_up()
    what = (f"{cfg.backbone.name} / {cfg.mode.name} / {len(pipe.cfg.denoising_steps)} step(s) / "
            f"{cfg.height}x{cfg.width} on {pipe.device} ({str(pipe.dtype).replace('torch.', '')}): "
            f"{describe_paths(cfg)}")
    if pipe.warmup_s is not None:
        what += f"; warm-up {pipe.warmup_s:.1f} s (JIT, autotuning, graph capture; not in any timing)"
    dummy = (f"DUMMY weights (random init) in the {', '.join(dummy_parts(pipe, cfg))}: the output is noise, timings "
             f"are real ({dummy_hint})") if pipe.weights_are_dummy else ""
    if announce is not None:
        announce(f"{what}; {dummy or 'real weights'}")
    else:
        log.info("built %s", what)
        if dummy:
            log.warning(dummy)
    return pipe


def _build_pipeline(cfg: DictConfig) -> StreamPipeline:
    """The one build sequence: exactly what this process's placement names (the whole model, or a pipe stage)."""
    pcfg = pipeline_config(cfg).validate()  # every setting checked before any model is built
    place = placement_of(cfg)
    device = place.ctx.device if place.ctx is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    to_precision = dit_precision_step(cfg.dit_precision, cfg.fp8_kernel, cfg.fp8_granularity)  # checked before loading
    torch.manual_seed(cfg.seed)
    dit = load_backbone(dit_config(cfg), dit_weights(cfg), device=device, dtype=dtype, seed=cfg.seed,
                        parts=place.parts, **dit_load_options(cfg))
    dit = to_precision(dit)  # after loading: names stay loadable
    if compile_kernels(cfg):
        dit.use_compiled_kernels(True)
    vae = build_vae(cfg, device, dtype) if place.holds_vae else None
    text = build_text_encoder(cfg, device, dtype) if place.holds_text_encoder else None
    stage = pipe_stage(place, dit, vae, pcfg, cfg, device, dtype) if place.pipe else None
    pipe = StreamPipeline(dit, vae, text, pcfg, device=device, dtype=dtype, executor=stage)
    if stage is not None:
        stage.attach(pipe.driver)
    return pipe
