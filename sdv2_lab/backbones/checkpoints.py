"""Readers for the official DiT checkpoint formats, key converters, strict checks and dummy weights.

Accepted ``weights``:
* a Wan2.1 folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or the sharded set with
  ``diffusion_pytorch_model.safetensors.index.json`` (original Wan key names);
* a StreamDiffusionV2 ``model.pt`` (or a folder holding one): a dict with ``generator``, ``generator_ema``,
  ``state_dict`` or ``model`` (first hit wins, as the reference; ``container_keys`` changes the order), or a flat
  state dict; keys with or without ``model.``. The causal-Wan plugins' files are such containers: Self-Forcing,
  Rolling Forcing, Causal Forcing and LongLive (``generator`` / ``generator_ema``), CausVid (``model``), Krea
  Realtime (a flat ``model.*`` safetensors). Wrapper names (FSDP's ``_fsdp_wrapped_module.``, torch.compile's
  ``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``) are dropped wherever they appear;
* a diffusers ``WanTransformer3DModel`` folder or file (its key names are converted);
* any single ``.safetensors`` / ``.pt`` / ``.pth`` state dict in one of those namings;
* ``"dummy"``: random init at the configured size, directly on the device (for throughput work).

A PEFT LoRA file (LongLive's ``lora.pt``) can be merged at load (``lora=``, see ``lora.py``).

Loading is strict (missing, unexpected or mis-shaped keys raise, naming the file) and goes through the
meta device: every tensor is read (memory-mapped), cast and moved on its own, so a 14B checkpoint needs
about its bf16 size in device memory and no fp32 copy.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from .files import (CONTAINER_KEYS, SDV2_CONTAINER_KEYS, WRAPPER_NAMES, CheckpointError,  # noqa: F401 (re-exported)
                    read_tensor_file as _read_tensor_file, strip_wrappers)
from .wan_dit import CausalWanDiT, WanDiTConfig

log = logging.getLogger(__name__)

WAN_SINGLE = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SDV2_FILE = "model.pt"
WAN_HEAD_DIM = 128  # every released Wan2.1 DiT (1.3B: 1536 / 12 heads, 14B: 5120 / 40 heads)

# diffusers WanTransformer3DModel name <-> original Wan name; "{n}" is a block index. One table serves both
# directions. Block norms are swapped: diffusers norm2 is Wan's affine cross-attention norm3 (the FFN norms of
# both have no parameters).
_DIFFUSERS_NAMES: list[tuple[str, str]] = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("blocks.{n}.ffn.net.0.proj.", "blocks.{n}.ffn.0."),
    ("blocks.{n}.ffn.net.2.", "blocks.{n}.ffn.2."),
    ("blocks.{n}.norm2.", "blocks.{n}.norm3."),
    ("blocks.{n}.attn1.to_out.0.", "blocks.{n}.self_attn.o."),
    ("blocks.{n}.attn2.to_out.0.", "blocks.{n}.cross_attn.o."),
    *[(f"blocks.{{n}}.attn{i}.to_{p}.", f"blocks.{{n}}.{attn}.{p}.")
      for i, attn in ((1, "self_attn"), (2, "cross_attn")) for p in "qkv"],
    *[(f"blocks.{{n}}.attn{i}.norm_{p}.", f"blocks.{{n}}.{attn}.norm_{p}.")
      for i, attn in ((1, "self_attn"), (2, "cross_attn")) for p in "qk"],
]


def _rename_rules(to_wan: bool) -> list[tuple[re.Pattern, str]]:
    """Regex rules for one direction: a template ending in "." renames a prefix, any other a whole key."""
    rules = []
    for diffusers, wan in _DIFFUSERS_NAMES:
        src, dst = (diffusers, wan) if to_wan else (wan, diffusers)
        pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(pattern), dst.replace("{n}", r"\1")))
    return rules


_TO_WAN, _TO_DIFFUSERS = _rename_rules(True), _rename_rules(False)


def _rename(sd: Mapping[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = pattern.subn(repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def convert_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original Wan names."""
    return _rename(sd, _TO_WAN)


def to_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers names (for exporting and for round-trip tests)."""
    return _rename(sd, _TO_DIFFUSERS)


# ---------------------------------------------------------------------------------------------- file reading
def resolve_weight_files(weights: str | Path) -> tuple[list[Path], Optional[dict]]:
    """The tensor files behind ``weights`` and the folder's config.json (if any)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DiT weights not found: {path}")
    if path.is_file():
        cfg_file = path.parent / "config.json"
        return [path], (json.loads(cfg_file.read_text()) if cfg_file.name and cfg_file.exists()
                        and path.suffix == ".safetensors" else None)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if (path / WAN_INDEX).exists():
        index = json.loads((path / WAN_INDEX).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).exists()]
        if not shards or missing:
            raise FileNotFoundError(f"{path / WAN_INDEX}: shard files missing: {missing or 'index lists none'}")
        return [path / s for s in shards], config
    for name in (WAN_SINGLE, SDV2_FILE):
        if (path / name).exists():
            return [path / name], config
    found = sorted(p.name for p in path.iterdir())[:10]
    raise FileNotFoundError(f"{path}: no DiT weights; expected {WAN_SINGLE}, {WAN_INDEX} (+ shards) or {SDV2_FILE}; "
                            f"found {found}")


def read_state_dict(weights: str | Path) -> tuple[dict[str, torch.Tensor], str, Optional[dict]]:
    """Read and normalise a checkpoint's keys to the original Wan names. Returns (state dict, source, config)."""
    sd, source, config, _ = read_selected(weights)
    return sd, source, config


def read_selected(weights: str | Path, keys: Optional[set[str]] = None, container_keys=None
                  ) -> tuple[dict[str, torch.Tensor], str, Optional[dict], list[str]]:
    """``read_state_dict`` for some tensors: (state dict, source, config, every key of the file in Wan names).
    ``keys``: read only these tensors (Wan names); the others are listed, not read (safetensors lazily per key,
    ``model.pt`` memory-mapped: a pipe stage reads only its own blocks). ``container_keys``: the top-level keys of
    a torch pickle to try, in order (default ``CONTAINER_KEYS``)."""
    lazy, source, config = _wan_entries(weights, container_keys)
    sd = {wan: read() for wan, (read, _) in lazy.items() if keys is None or wan in keys}
    return sd, source, config, list(lazy)


def _wan_entries(weights, container_keys=None) -> tuple[dict[str, tuple], str, Optional[dict]]:
    """(Wan name -> (reader, shape), source, config.json) for every tensor behind ``weights``; nothing is read."""
    files, config = resolve_weight_files(weights)
    source = ", ".join(str(f) for f in files)
    lazy: dict[str, tuple] = {}   # file key -> (reader, shape)
    for f in files:
        lazy.update(_lazy_tensors(f, CONTAINER_KEYS if container_keys is None else tuple(container_keys)))
    names = {k: strip_wrappers(k) for k in lazy}   # before the prefix rule: FSDP may sit before "model."
    if names and all(k.startswith("model.") for k in names.values()):
        names = {k: v[len("model."):] for k, v in names.items()}
    if is_diffusers_layout(names.values()):
        names = dict(zip(names, convert_diffusers_keys(dict.fromkeys(names.values())).keys()))
    seen: dict[str, str] = {}
    for key, wan in names.items():   # two file keys for one parameter: which to load would be a guess
        if wan in seen:
            raise CheckpointError(f"{source}: keys {seen[wan]!r} and {key!r} both name {wan!r}")
        seen[wan] = key
    return {names[k]: v for k, v in lazy.items()}, source, config


def _lazy_tensors(path: Path, container_keys=CONTAINER_KEYS) -> dict[str, tuple]:
    """key -> (a function reading that tensor, its shape) (safetensors: per key from the file, shapes from the
    header; torch files: a memory-mapped state dict, so an unread tensor costs no memory)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        handle = safe_open(str(path), framework="pt", device="cpu")
        return {k: ((lambda k=k: handle.get_tensor(k)), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}
    sd = _read_tensor_file(path, container_keys)
    return {k: ((lambda v=v: v), tuple(v.shape)) for k, v in sd.items()}


def size_from_checkpoint(weights: str | Path, container_keys=None) -> dict[str, int]:
    """The DiT size of a checkpoint from its tensor shapes (no tensor is read): ``dim`` (the self-attention key
    projection's rows, as Krea Realtime tells 1.3B from 14B), ``ffn_dim``, ``num_layers`` (distinct block
    indices) and ``num_heads`` = dim / 128 (the head size of every released Wan2.1 DiT; no tensor holds it)."""
    lazy, source, _ = _wan_entries(weights, container_keys)

    def rows(key: str) -> int:
        if key not in lazy:
            raise CheckpointError(f"{source}: no {key!r}, so the DiT size cannot be read; keys e.g. {list(lazy)[:4]}")
        return int(lazy[key][1][0])

    dim, ffn_dim = rows("blocks.0.self_attn.k.weight"), rows("blocks.0.ffn.0.weight")
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(f"{source}: dim {dim} is not a multiple of Wan's head size {WAN_HEAD_DIM}")
    layers = {m.group(1) for m in map(re.compile(r"blocks\.(\d+)\.").match, lazy) if m}
    return dict(dim=dim, ffn_dim=ffn_dim, num_heads=dim // WAN_HEAD_DIM, num_layers=len(layers))


def check_config(cfg: WanDiTConfig, config: Optional[dict], source: str) -> None:
    """A Wan folder's config.json must describe the configured size (it names dim/num_layers/...)."""
    if not config:
        return
    aliases = {"dim": ("dim",), "ffn_dim": ("ffn_dim",), "num_heads": ("num_heads", "num_attention_heads"),
               "num_layers": ("num_layers",)}
    for ours, theirs in aliases.items():
        for key in theirs:
            if key in config and int(config[key]) != getattr(cfg, ours):
                raise CheckpointError(f"{source}: config.json has {key}={config[key]} but backbone {cfg.name!r} "
                                      f"expects {ours}={getattr(cfg, ours)}; pick the backbone that fits the file")


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                     file_keys: Optional[list[str]] = None) -> None:
    """Strict: the file's keys are exactly the model's and every tensor read has the model's shape.
    ``file_keys``: every key of the file when ``sd`` holds only the tensors read (a pipe stage)."""
    expected = model.state_dict()
    keys = set(sd if file_keys is None else file_keys)
    missing = [k for k in expected if k not in keys]
    unexpected = [k for k in (sd if file_keys is None else file_keys) if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
              if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        parts = [f"checkpoint {source} does not fit backbone {name!r}:"]
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped keys, e.g. " + "; ".join(
                f"{k}: file {s} vs model {e}" for k, s, e in shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        raise CheckpointError("\n  ".join(parts))


# ---------------------------------------------------------------------------------------------- building
def stage_parts(num_layers: int, first: int, end: int, *, embed: bool, head: bool) -> list[str]:
    """The parts a ``pipe`` stage holds: blocks [first, end), plus the embeddings (patch, time, text) on the
    first stage and the head on the last."""
    if not 0 <= first < end <= num_layers:
        raise ValueError(f"block range [{first}, {end}) is not inside the model's {num_layers} blocks")
    parts = ["patch_embedding", "text_embedding", "time_embedding", "time_projection"] if embed else []
    return parts + [f"blocks.{i}" for i in range(first, end)] + (["head"] if head else [])


def load_backbone(cfg: WanDiTConfig, weights: str | Path | None, *, device="cpu", dtype=torch.bfloat16,
                  seed: int = 0, parts: Optional[list[str]] = None, lora: str | Path | None = None,
                  lora_alpha: Optional[float] = None, container_keys: Optional[Sequence[str]] = None
                  ) -> CausalWanDiT:
    """Build the DiT of ``cfg`` on ``device``/``dtype`` with ``weights`` (a path, or ``"dummy"``/None).

    ``container_keys``: the top-level keys of a torch pickle to try, in order (a plugin's preference, e.g.
    ``("generator_ema", "generator")``); default ``CONTAINER_KEYS``. ``lora``: a PEFT LoRA file merged into the
    block Linears after the strict base load (``lora.read_lora`` / ``merge_lora``; ``lora_alpha`` default: the
    rank); dummy weights refuse one.

    ``parts`` (``stage_parts``): build only these parts (a ``pipe`` stage); the others stay on the meta device,
    cost no memory and are not read from the file. The file is still checked strictly against the whole model
    (every key present, none unexpected), and the tensors read are checked for shape. Dummy weights are drawn
    per part (``CausalWanDiT.init_weights(seed=...)``), so a stage's share equals the full model's."""
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    held = model.part_names() if parts is None else list(parts)
    unknown = [p for p in held if p not in model.part_names()]
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; the parts are {model.part_names()[:5]} ... 'head'")
    if weights is None or str(weights) == "dummy":
        if lora is not None:
            raise CheckpointError(f"dummy (random) DiT weights cannot take a LoRA file ({lora}); "
                                  "give base weights, or no lora")
        _materialize(model, held, device, dtype)
        model.init_weights(seed=seed, parts=held)
        model.weights_are_dummy = True
        model.fuse_qkv()
        log.warning("DiT %s uses DUMMY (random) weights: outputs are noise; use them for throughput only", cfg.name)
        return model.eval().requires_grad_(False)
    wanted = {k for name in held for k in _part_keys(model, name)}
    sd, source, config, file_keys = read_selected(weights, keys=wanted, container_keys=container_keys)
    check_config(cfg, config, source)
    check_state_dict(model, sd, source, file_keys)   # on the meta model: nothing allocated yet
    if lora is not None:
        from .lora import merge_lora, read_lora
        lora_pairs = read_lora(lora, model)        # checked against the meta model, before any allocation
    _materialize(model, held, device, dtype)
    # Cast/move one tensor at a time so peak memory is one target-dtype copy.
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for k in sorted(wanted):
            params[k].copy_(sd.pop(k).to(device=device, dtype=params[k].dtype))
    if lora is not None:   # before fuse_qkv: the merge writes the separate q/k/v weights
        merge_lora(model, lora_pairs, alpha=lora_alpha, source=str(lora))
    model.fuse_qkv()
    return model.eval().requires_grad_(False)


def _materialize(model: CausalWanDiT, parts: list[str], device: torch.device, dtype: torch.dtype) -> None:
    for name in parts:
        model.get_submodule(name).to_empty(device=device).to(dtype)


def _part_keys(model: CausalWanDiT, name: str) -> list[str]:
    return [f"{name}.{k}" for k in model.get_submodule(name).state_dict()]
