"""PEFT LoRA files merged into the DiT's Linear weights at load (LongLive's ``lora.pt``).

LongLive wraps its ``CausalWanModel`` with ``peft.get_peft_model`` (a LoRA on every ``nn.Linear`` of each
attention block, r = alpha = 256) and saves ``{'generator_lora': get_peft_model_state_dict(...)}``: keys like
``base_model.model.blocks.0.self_attn.q.lora_A.weight`` (PEFT drops the adapter name ``default`` when saving and
puts it back when loading). Accepted here, in any combination: the ``generator_lora`` container or a flat file
(torch pickle or safetensors); a leading ``base_model.model.`` and/or ``model.``; ``.lora_A.weight`` or
``.lora_A.default.weight``; wrapper names (FSDP, torch.compile) anywhere. The merge is PEFT's
``merge_and_unload``: W += (alpha / r) * B @ A, so the model keeps plain Wan weights and runs at base speed.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .files import CheckpointError, read_tensor_file, strip_wrappers

log = logging.getLogger(__name__)

LORA_CONTAINER_KEYS = ("generator_lora",)
_PREFIXES = ("base_model.model.", "model.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def lora_target(key: str) -> tuple[str, str]:
    """A PEFT key -> (our module name, "A" or "B"); raises ValueError for a key that is no LoRA A/B weight."""
    name = strip_wrappers(key)
    while name.startswith(_PREFIXES):   # PEFT's base_model.model., then a wrapper's model. (either may be absent)
        name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
    m = _LORA_KEY.match(name)
    if m is None:
        raise ValueError(key)
    return m["module"], m["ab"]


def read_lora(path: str | Path, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The LoRA pairs of ``path`` by module name: {name: (A [r, in], B [out, r])}, checked against ``model``
    (which may still be on the meta device): every pair targets a Linear of the model and fits its weight."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    sd = read_tensor_file(path, LORA_CONTAINER_KEYS)
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        try:
            module, ab = lora_target(key)
        except ValueError:
            raise CheckpointError(f"{path}: {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' / "
                                  "'.lora_B.weight', optionally with 'base_model.model.' and '.default')") from None
        if ab in halves.setdefault(module, {}):
            raise CheckpointError(f"{path}: {halves[module][ab][0]!r} and {key!r} are both lora_{ab} of {module!r}")
        halves[module][ab] = (key, value)
    if not halves:
        raise CheckpointError(f"{path}: no LoRA weights in the file")
    pairs = {}
    for module, ab in halves.items():
        key = next(iter(ab.values()))[0]
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {key!r} has no lora_{'B' if 'A' in ab else 'A'} partner")
        try:
            target = model.get_submodule(module)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            what = "no module" if target is None else f"a {type(target).__name__}, not a Linear"
            raise CheckpointError(f"{path}: {key!r} targets {module!r}, which is {what} of the model")
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        out_f, in_f = target.weight.shape
        if a.dim() != 2 or a.shape[1] != in_f:
            raise CheckpointError(f"{path}: {key_a!r} has shape {tuple(a.shape)}; {module}.weight is "
                                  f"{(out_f, in_f)}, so lora_A must be [r, {in_f}]")
        if b.dim() != 2 or tuple(b.shape) != (out_f, a.shape[0]):
            raise CheckpointError(f"{path}: {key_b!r} has shape {tuple(b.shape)}; expected [{out_f}, {a.shape[0]}] "
                                  f"({module}.weight is {(out_f, in_f)}, rank {a.shape[0]} from lora_A)")
        pairs[module] = (a, b)
    return pairs


@torch.no_grad()
def merge_lora(model: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
               alpha: Optional[float] = None, source: str = "LoRA") -> int:
    """W += (alpha / r) * B @ A for every pair (``read_lora``) whose weight the model holds (a ``pipe`` stage
    skips the others), computed in float32 and cast back. ``alpha`` None: alpha = r (scale 1, as LongLive's
    r = alpha = 256). Returns how many weights were merged. Call before ``fuse_qkv``: it replaces q/k/v."""
    merged = 0
    for module, (a, b) in pairs.items():
        w = model.get_submodule(module).weight
        if w.is_meta:
            continue
        r = a.shape[0]
        scale = (r if alpha is None else alpha) / r
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
        w.copy_((w.float() + scale * delta).to(w.dtype))
        merged += 1
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    log.info("%s: merged a LoRA into %d Linear weights (rank %s, alpha %s)", source, merged,
             ranks[0] if len(ranks) == 1 else ranks, "= rank" if alpha is None else alpha)
    return merged
