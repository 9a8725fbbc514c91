"""The metric interface, the registry and ``build_metrics``.

A metric is built once from the ``metrics`` config and then called per clip:
``metric(inputs, outputs, prompt) -> {key: float}`` with ``inputs``/``outputs`` float tensors ``[T, 3, H, W]`` in
[0, 1] (same shape). Metrics are pure functions of the frames: no state is kept between calls.

Metrics that need weights take them from local paths only (no downloads). When a path is not set or does not
exist, construction raises ``MetricUnavailable``; ``build_metrics`` then leaves that metric out, logs the reason
once and carries on with the rest.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from ..registry import Registry

log = logging.getLogger(__name__)

NAN = math.nan


class MetricUnavailable(Exception):
    """A metric cannot be built because its weights are not available locally.

    The message says which file or folder is expected, which config key to set and how to obtain it."""

    def __init__(self, message: str, *, config_key: Optional[str] = None, path: Optional[str] = None):
        super().__init__(message)
        self.config_key = config_key
        self.path = path


@runtime_checkable
class Metric(Protocol):
    name: str

    def __call__(self, inputs: torch.Tensor, outputs: torch.Tensor, prompt: Optional[str] = None) -> dict[str, float]:
        ...


# factory(metrics_cfg, shared) -> Metric. `shared` is a per-build_metrics dict so metrics can share one loaded
# network (clip_consistency and clip_score load CLIP once) without module-level state.
MetricFactory = Callable[[Mapping, dict], Metric]
METRICS: Registry[MetricFactory] = Registry("metric")


def register_metric(name: str):
    """Decorator: register ``factory(metrics_cfg, shared) -> Metric`` under ``name``."""
    return METRICS.register(name)


available_metrics = METRICS.names


def build_metrics(cfg: Optional[Mapping]) -> tuple[list[Metric], dict[str, str]]:
    """Build the metrics listed in ``cfg.enabled`` (a mapping like conf/metrics/default.yaml).

    Returns (metrics in the order enabled, {name: reason} for the ones left out for lack of weights).
    Unknown names raise ValueError listing the valid ones; a wrong weights file (present but not loadable as
    the expected network) raises too, since that is a configuration error rather than a missing download."""
    cfg = as_plain_dict(cfg)
    enabled = list(dict.fromkeys(cfg.get("enabled") or []))   # drop duplicates, keep order
    unknown = [name for name in enabled if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid metrics: {available_metrics()}")
    metrics: list[Metric] = []
    unavailable: dict[str, str] = {}
    shared: dict = {}
    for name in enabled:
        try:
            metrics.append(METRICS.get(name)(cfg, shared))
        except MetricUnavailable as err:
            unavailable[name] = str(err)
    by_reason: dict[str, list[str]] = {}
    for name, reason in unavailable.items():  # metrics sharing weights (CLIP) share one message
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        log.warning("metric%s %s skipped (recorded as missing): %s", "s" if len(names) > 1 else "",
                    ", ".join(names), reason)
    return metrics, unavailable


# ------------------------------------------------------------------------------------------------- helpers

def as_plain_dict(cfg: Optional[Mapping]) -> dict:
    """An OmegaConf DictConfig or any mapping -> a plain dict (None -> {})."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a project dependency
        pass
    return dict(cfg)


def section(cfg: Mapping, name: str) -> dict:
    """cfg[name] as a dict ({} when missing or null)."""
    return dict(cfg.get(name) or {})


def check_frames(*videos: torch.Tensor) -> None:
    """Each video is a float [T, 3, H, W] tensor; all have the same shape."""
    for video in videos:
        if not (isinstance(video, torch.Tensor) and video.ndim == 4 and video.shape[1] == 3
                and video.is_floating_point()):
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"frames must be a float tensor [T, 3, H, W] in [0, 1], got {shape}")
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) > 1:
        raise ValueError(f"input and output frames must have the same shape [T, 3, H, W], got {sorted(shapes)}")


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 by rounding, as a video encoder/decoder round-trip would store them."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def existing_path(path: Optional[str], *, config_key: str, what: str, how: str, example: str) -> str:
    """Return ``path`` if it exists, else raise MetricUnavailable saying what to put where and how to get it.
    ``example`` is the file or folder name that the message shows in ``config_key=/path/to/<example>``."""
    import os
    if not path:
        raise MetricUnavailable(f"no {what}: set {config_key}=/path/to/{example}. {how}", config_key=config_key)
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise MetricUnavailable(f"{what} not found at {path} ({config_key}). {how}",
                                config_key=config_key, path=path)
    return path


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A torch state dict saved with torch.save (tensors only), on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def device_of(cfg: Mapping) -> torch.device:
    return torch.device(cfg.get("device") or "cpu")


def as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)
