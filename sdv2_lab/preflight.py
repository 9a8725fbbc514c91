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
    """The device, the frame rates, sizes, steps, resolution, chunk and cache settings
    (``PipelineConfig.validate``), the backbone's shape, and the weight files that exist (a truncated one is
    named)."""
    from .settings import backbone_config, pipeline_config
    check_device(cfg)
    check_rates(cfg)
    backbone_config(cfg)
    pipeline_config(cfg).validate()
    for path in weight_files(cfg):
        check_torch_file(path)


def check_device(cfg: DictConfig, because: str = "") -> None:
    """A GPU asked for (``device=cuda``, ``cuda:k``) on a machine without one (or with fewer), said before
    anything is built or launched. ``because``: where the setting came from (`` (set by experiment=...)``)."""
    spec = str(cfg.get("device", "cpu"))
    if not spec.startswith("cuda"):
        return
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={spec}{because} needs a CUDA GPU and this machine has none "
                           f"(torch {torch.__version__}): run it on a GPU machine, or set device=cpu")
    index = spec.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise RuntimeError(f"device={spec}{because}: this machine has {torch.cuda.device_count()} GPU(s) "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def check_rates(cfg: DictConfig) -> None:
    """Frame rates: the output video's ``fps`` and the input's ``input.fps`` (frames per second, at least 1:
    an mp4 stores a whole number), ``target_fps`` (null or positive)."""
    rates = [("fps", cfg.get("fps"))]
    if cfg.get("input") is not None and "fps" in cfg.input:
        rates.append(("input.fps", cfg.input.fps))
    for key, value in rates:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ValueError(f"{key}={value!r}: expected a frame rate of at least 1 (frames per second, e.g. "
                             f"{key}=16)")
    target = cfg.get("target_fps")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0):
        raise ValueError(f"target_fps={target!r}: expected a positive number of frames per second, or null")


def weight_files(cfg: DictConfig) -> list[Path]:
    """The torch files a ``weights=real`` run will read, among those present (loaders name missing ones)."""
    if cfg.weights.kind != "real":
        return []
    files = []
    ckpt, wan, vae = cfg.weights.get("checkpoint"), cfg.weights.get("wan_folder"), cfg.vae
    if ckpt:
        p = Path(ckpt).expanduser()
        files.append(p / GENERATOR_FILE if p.is_dir() else p)
    from .settings import checkpoint_rules
    lora = checkpoint_rules(cfg).get("lora")
    if lora:   # a plugin's LoRA (LongLive's lora.pt): a missing one is named now, not after the base has loaded
        if not Path(lora).expanduser().is_file():
            raise FileNotFoundError(f"backbone {cfg.backbone.name}: its LoRA file {lora} (backbone.checkpoint.lora) "
                                    f"does not exist; set backbone.checkpoint.lora=PATH, or null for the base alone")
        files.append(Path(lora).expanduser())
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
