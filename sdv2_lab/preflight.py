"""Checks that run before any model is built, shared by ``sdv2 run``, ``sdv2 eval``, ``run_v2v.sh`` and the API:
a bad setting or a damaged file fails in a second with a message saying what to change, not after minutes of
loading (or mid-stream)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .seed_config import GENERATOR_FILE, T5_FILE, TAEHV_FILE, VAE_FILE, check_torch_file


def user_errors() -> tuple[type, ...]:
    """What a wrong setting, file or input raises: the command lines print these as one line, no traceback
    (``SDV2_TRACEBACK=1`` shows it)."""
    import os
    if os.environ.get("SDV2_TRACEBACK"):
        return ()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return ValueError, TypeError, OSError, RuntimeError, HydraException, OmegaConfBaseException


def check_config(cfg: DictConfig) -> None:
    """Sizes, steps, resolution, chunk and cache settings (``PipelineConfig.validate``), the backbone's
    shape, and the weight files that exist (a truncated one is named)."""
    from .build import backbone_config, pipeline_config
    backbone_config(cfg)
    pipeline_config(cfg).validate()
    for path in weight_files(cfg):
        check_torch_file(path)


def weight_files(cfg: DictConfig) -> list[Path]:
    """The torch files a ``weights=real`` run will read, among those present (loaders name missing ones)."""
    if cfg.weights.kind != "real":
        return []
    files = []
    ckpt, wan, vae = cfg.weights.get("checkpoint"), cfg.weights.get("wan_folder"), cfg.vae
    if ckpt:
        p = Path(ckpt).expanduser()
        files.append(p / GENERATOR_FILE if p.is_dir() else p)
    if vae.name == "taehv":
        files.append(Path(vae.get("path") or cfg.weights.get("taehv") or TAEHV_FILE))
    if vae.name == "wan" and vae.get("path"):
        files.append(Path(vae.path))
    elif wan and vae.get("encoder", "wan") == "wan":
        files.append(Path(wan) / VAE_FILE)
    if wan and cfg.text_encoder.name == "umt5":
        t5 = Path(cfg.text_encoder.get("checkpoint") or T5_FILE)
        files.append(t5 if t5.is_absolute() else Path(wan) / t5)
    return [f for f in files if f.suffix in (".pt", ".pth", ".bin") and f.is_file()]
