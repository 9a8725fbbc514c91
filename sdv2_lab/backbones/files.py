"""Reading weight files, below every loader: the container keys of the published pickles, the wrapper names that
training frameworks insert into parameter names, and a file's flat state dict. ``checkpoints.py`` (the DiT) and
``lora.py`` (a LoRA merged into it) both read through here."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

log = logging.getLogger("sdv2_lab.backbones.checkpoints")   # one logger for what the DiT loaders say

SDV2_CONTAINER_KEYS = ("generator", "generator_ema", "state_dict")  # checked in this order, as the reference
# The default order: StreamDiffusionV2's, then CausVid's ``{'model': sd}``. A plugin preferring EMA weights passes
# its own order (``container_keys=("generator_ema", "generator")``), as those repos' ``use_ema`` does.
CONTAINER_KEYS = (*SDV2_CONTAINER_KEYS, "model")
# Module names that wrappers insert into parameter names; they are not part of the model.
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the configured model."""


def strip_wrappers(key: str) -> str:
    """A parameter name without the wrapper module names (FSDP, torch.compile, checkpointing) inside it."""
    for name in WRAPPER_NAMES:
        key = key.replace(name, "")
    return key


def read_tensor_file(path: Path, container_keys=CONTAINER_KEYS) -> dict[str, torch.Tensor]:
    """A file's flat state dict: the first of ``container_keys`` holding a mapping, or the whole file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping), found {type(obj).__name__}")
    found = next((k for k in container_keys if isinstance(obj.get(k), Mapping)), None)
    if found is not None:
        log.info("%s: using the %r entry", path, found)
        obj = obj[found]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad and found is None:
        raise CheckpointError(f"{path}: none of the expected container keys {list(container_keys)} and not a flat "
                              f"dict of tensors; top-level keys found: {sorted(map(str, obj))[:10]}")
    if bad:
        raise CheckpointError(f"{path}: the {found!r} entry is not a state dict; non-tensor entries {bad[:5]}")
    return dict(obj)
