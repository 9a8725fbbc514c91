"""Text encoding: Wan's UMT5-XXL encoder (via transformers), its tokenizer, and a prompt-embedding cache.

``HashedTextEncoder`` (``hashed.py``) is the weightless stand-in; everything else here is the real encoder. Both
are built by name from ``TEXT_ENCODERS`` (``conf/text_encoder/<name>.yaml``'s ``name``): ``build_text_encoder``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..registry import Registry
from .hashed import HashedTextEncoder
from .prompt_cache import PromptCache

__all__ = ["TextEncoder", "PromptCache", "PromptTokenizer", "clean_prompt", "synthetic_tokenizer", "UMT5Size",
           "UMT5_XXL", "CheckpointMismatchError", "load_wan_t5", "load_hf_umt5", "build_text_encoder", "TEXT_ENCODERS",
           "HashedTextEncoder"]


# The real encoder's modules import transformers (~2.5 s): loaded on first use, so that a run with the hashed
# encoder (the default) never pays for it.
_LAZY = {"TextEncoder": "encoder", "PromptTokenizer": "tokenizer", "clean_prompt": "tokenizer",
         "synthetic_tokenizer": "tokenizer", "UMT5_XXL": "umt5", "CheckpointMismatchError": "umt5",
         "UMT5Size": "umt5", "load_hf_umt5": "umt5", "load_wan_t5": "umt5"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TEXT_ENCODERS: Registry = Registry("text encoder")


def build_text_encoder(cfg: Mapping, *, wan_folder: str | Path | None, dummy: bool, device, dtype: torch.dtype,
                       text_dim: int = 4096):
    """The text encoder ``cfg`` (a ``conf/text_encoder`` group) names; ``text_dim``: the width the DiT expects."""
    return TEXT_ENCODERS.get(cfg["name"])(cfg, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype,
                                          text_dim=text_dim)


@TEXT_ENCODERS.register("hashed")
def build_hashed(cfg: Mapping, *, text_dim: int = 4096, **_) -> HashedTextEncoder:
    """No weights: a prompt-seeded random embedding of the DiT's text width."""
    return HashedTextEncoder(dim=text_dim)


@TEXT_ENCODERS.register("umt5")
def build_umt5(cfg: Mapping, *, wan_folder: str | Path | None, dummy: bool, device, dtype: torch.dtype,
               text_dim: int = 4096) -> TextEncoder:
    """A ``TextEncoder`` from a ``conf/text_encoder`` group (see ``umt5_xxl.yaml`` for the keys).

    Real weights: ``cfg.checkpoint`` is a transformers folder (has ``config.json``) or a Wan ``.pth`` (relative
    to ``wan_folder`` unless absolute). Dummy weights: random at ``cfg``'s size; the tokenizer is the Wan
    folder's when there is one, else a synthetic one.
    """
    from .encoder import TextEncoder
    from .umt5 import UMT5Size
    size = UMT5Size.from_mapping(cfg)
    common = dict(device=device, dtype=dtype, offload=bool(cfg.get("offload", False)),
                  text_len=int(cfg.get("text_len", 512)), cache_size=int(cfg.get("cache_size", 16)),
                  trim_padding=bool(cfg.get("trim_padding", True)),
                  attn_implementation=str(cfg.get("attn_implementation", "sdpa")))
    tokenizer = cfg.get("tokenizer", "google/umt5-xxl")
    tokenizer_dir = Path(wan_folder) / tokenizer if wan_folder else (Path(tokenizer) if tokenizer else None)
    if dummy:
        found = tokenizer_dir if tokenizer_dir is not None and tokenizer_dir.is_dir() else None
        return TextEncoder.from_config(size, dummy=True, tokenizer_dir=found, seed=int(cfg.get("seed", 0)), **common)
    checkpoint = Path(cfg.get("checkpoint", "models_t5_umt5-xxl-enc-bf16.pth"))
    if not checkpoint.is_absolute():
        if not wan_folder:
            raise ValueError("real text-encoder weights need weights.wan_folder (or an absolute "
                             "text_encoder.checkpoint)")
        checkpoint = Path(wan_folder) / checkpoint
    if (checkpoint / "config.json").is_file():  # a transformers/diffusers folder; its tokenizer is found beside it
        found = tokenizer_dir if tokenizer_dir is not None and tokenizer_dir.is_dir() else None
        return TextEncoder.from_pretrained_dir(checkpoint, tokenizer_dir=found, **common)
    if tokenizer_dir is None:
        raise ValueError("real text-encoder weights need a tokenizer folder (text_encoder.tokenizer)")
    return TextEncoder.from_wan_folder(checkpoint.parent, size=size, checkpoint=checkpoint.name,
                                       tokenizer=str(tokenizer_dir.resolve()), **common)
