"""Config (``conf/``) -> components -> a ready ``StreamPipeline``. The one place that reads Hydra configs and
knows every registry; the models themselves know nothing of Hydra."""
from __future__ import annotations

import gc
import logging
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .backbones.checkpoints import load_backbone
from .backbones.fp8 import apply_dit_precision
from .backbones.wan_dit import WanDiTConfig
from .stream.noise_controller import NoiseControllerConfig
from .stream.pipeline import PipelineConfig, StreamPipeline
from .configs import CONF_DIR, compose_config  # noqa: F401  (defined in configs.py; imported from here too)

log = logging.getLogger(__name__)


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


def vae_accelerate(cfg: DictConfig) -> str:
    """``vae.accelerate`` resolved: auto = cuda_graph on CUDA, none on a CPU."""
    value = cfg.vae.get("accelerate", "none")
    if value == "auto":
        return "cuda_graph" if on_cuda(cfg) else "none"
    return value or "none"


def fast_paths(cfg: DictConfig) -> dict:
    """What runs, as booleans and names (the log line and results rows read this, not the raw ``auto``)."""
    from .vae.wan_vae import use_fused
    accelerate = vae_accelerate(cfg)
    fused = "fused" in cfg.vae and cfg.vae.get("encoder", "wan") == "wan" and \
        use_fused(cfg.vae.fused, "cuda" if on_cuda(cfg) else "cpu", accelerate)
    return {"cuda_graph": switch(cfg, "cuda_graph"), "overlap": switch(cfg, "overlap"),
            "vae_accelerate": accelerate, "vae_fused": bool(fused), "warmup": switch(cfg, "warmup")}


def describe_paths(cfg: DictConfig) -> str:
    p = fast_paths(cfg)
    vae = cfg.vae.name + "".join(f", {x}" for x, on in (("fused", p["vae_fused"]),
                                                        (p["vae_accelerate"].replace("_", " "),
                                                         p["vae_accelerate"] != "none")) if on)
    return (f"DiT {'CUDA graph' if p['cuda_graph'] else 'eager'}, stages "
            f"{'overlapped on CUDA streams' if p['overlap'] else 'in turn'}, VAE {vae}")


def pipeline_config(cfg: DictConfig) -> PipelineConfig:
    return PipelineConfig(
        height=cfg.height, width=cfg.width, mode=cfg.mode.name, denoising_steps=denoising_steps(cfg),
        num_kv_cache=cfg.num_kv_cache, sink_frames=cfg.sink_frames, adapt_sink_threshold=cfg.adapt_sink_threshold,
        frames_per_block=cfg.frames_per_block,
        noise=NoiseControllerConfig(noise_scale=cfg.noise_scale, fixed=cfg.fixed_noise), t2v=cfg.t2v,
        position_refresh_frames=cfg.position_refresh_frames, target_fps=cfg.target_fps,
        cuda_graph=switch(cfg, "cuda_graph"), overlap=switch(cfg, "overlap"), max_streams=int(cfg.get("streams", 1)),
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


def dummy_parts(pipe: StreamPipeline) -> list[str]:
    parts = {"DiT": getattr(pipe, "dit", None), "VAE": getattr(pipe, "vae", None),
             "text encoder": getattr(pipe, "text_encoder", None)}
    return [name for name, part in parts.items() if getattr(part, "weights_are_dummy", False)]


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
            "device", "dtype", "dit_precision", "compile_kernels")
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
    dummy = (f"DUMMY weights (random init) in the {', '.join(dummy_parts(pipe))}: the output is noise, timings "
             f"are real ({dummy_hint})") if pipe.weights_are_dummy else ""
    if announce is not None:
        announce(f"{what}; {dummy or 'real weights'}")
    else:
        log.info("built %s", what)
        if dummy:
            log.warning(dummy)
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
    text = build_text_encoder(cfg, device, dtype)
    return StreamPipeline(dit, vae, text, pcfg, device=device, dtype=dtype)
