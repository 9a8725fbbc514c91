"""The UMT5-XXL encoder (Wan2.1's text encoder) as transformers' ``UMT5EncoderModel``, and its loaders.

Wan's ``T5Encoder`` and transformers' UMT5 encoder compute the same function (checked against the reference
in ``tests/test_text_encoder.py``): pre-norm RMSNorm blocks with fp32 statistics, unscaled attention logits,
a bidirectional bucketed relative-position bias owned by *every* layer, and a gated-GELU (tanh) FFN. The
FFN gate is named differently: Wan computes ``fc1(x) * gelu(gate(x))``, transformers
``gelu(wi_0(x)) * wi_1(x)``, so ``gate.0 -> wi_0`` and ``fc1 -> wi_1``.

Weights are built on the meta device and the checkpoint tensors are *assigned* in the target dtype and
device, so an 11 GB bf16 file never becomes a 23 GB fp32 model on the way.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
from transformers import UMT5Config, UMT5EncoderModel

WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"


@dataclass(frozen=True)
class UMT5Size:
    vocab: int = 256384
    dim: int = 4096
    heads: int = 64
    head_dim: int = 64
    ffn: int = 10240
    layers: int = 24
    buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "UMT5Size":
        """Read the size keys of a config (other keys are ignored)."""
        return cls(**{k: cfg[k] for k in asdict(cls()) if k in cfg})

    def hf_config(self, attn_implementation: str = "sdpa") -> UMT5Config:
        config = UMT5Config(
            vocab_size=self.vocab, d_model=self.dim, d_kv=self.head_dim, d_ff=self.ffn, num_layers=self.layers,
            num_heads=self.heads, relative_attention_num_buckets=self.buckets,
            relative_attention_max_distance=self.max_distance, layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
        config._attn_implementation = attn_implementation
        return config

    @classmethod
    def from_hf_config(cls, config: UMT5Config) -> "UMT5Size":
        return cls(vocab=config.vocab_size, dim=config.d_model, heads=config.num_heads, head_dim=config.d_kv,
                   ffn=config.d_ff, layers=config.num_layers, buckets=config.relative_attention_num_buckets,
                   max_distance=config.relative_attention_max_distance, eps=config.layer_norm_epsilon)


UMT5_XXL = UMT5Size()


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------- building
def build_umt5_meta(config: UMT5Config, dtype: torch.dtype) -> UMT5EncoderModel:
    """The model's structure with no storage (meta tensors) in ``dtype``; fill it with ``assign_weights``."""
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    return model.to(dtype).eval().requires_grad_(False)


def expected_shapes(model: UMT5EncoderModel) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys the model needs (the tied ``encoder.embed_tokens`` alias of ``shared`` excluded)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def assign_weights(model: UMT5EncoderModel, state: Mapping[str, torch.Tensor], *, device, dtype) -> None:
    """Move each tensor to ``device``/``dtype`` one at a time and make it the parameter (no second copy)."""
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    tie_embeddings(model)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:
        raise RuntimeError(f"UMT5 tensors left without storage after loading: {left[:5]}")


def tie_embeddings(model: UMT5EncoderModel) -> None:
    # the encoder looks tokens up in its own `embed_tokens`; it must be the very same Parameter as `shared`
    model.encoder.embed_tokens.weight = model.shared.weight


@torch.no_grad()
def init_dummy_weights(model: UMT5EncoderModel, *, seed: int = 0) -> None:
    """Random weights at the T5/Mesh-TF init scales (activations stay O(1)), drawn on the weights' device."""
    cfg = model.config
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    std = {"shared": 1.0, "q": (d * cfg.d_kv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": inner ** -0.5,
           "relative_attention_bias": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5, "wo": cfg.d_ff ** -0.5}
    gen = torch.Generator(device=model.shared.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        kind = name.split(".")[-2]
        if kind in ("layer_norm", "final_layer_norm"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std[kind], generator=gen)


def build_umt5_dummy(size: UMT5Size, *, device, dtype, seed: int = 0,
                     attn_implementation: str = "sdpa") -> UMT5EncoderModel:
    """Random weights at ``size``, allocated directly in ``dtype`` on ``device`` (for throughput runs)."""
    model = build_umt5_meta(size.hf_config(attn_implementation), dtype).to_empty(device=device)
    tie_embeddings(model)
    init_dummy_weights(model, seed=seed)
    return model


# ---------------------------------------------------------------------------------------------- checking
def check_keys(source: str, got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
               *, show: int = 5) -> None:
    """Raise ``CheckpointMismatchError`` naming ``source`` and the first missing/unexpected/mis-shaped keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [k for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not match the UMT5 encoder it is loaded into:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, e.g. {missing[:show]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, e.g. {unexpected[:show]}")
    if misshaped:
        shown = ", ".join(f"{k}: file {tuple(got[k])} vs expected {tuple(expected[k])}" for k in misshaped[:show])
        lines.append(f"  {len(misshaped)} keys with the wrong shape, e.g. {shown}")
    lines.append("  (is the text-encoder size in the config the one this file was saved with?)")
    raise CheckpointMismatchError("\n".join(lines))


# ---------------------------------------------------------------------------------------------- Wan format
# (Wan name, transformers name); {i} = block index, {p} = one of q/k/v/o
_KEY_PAIRS = [
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.{p}.weight", "encoder.block.{i}.layer.0.SelfAttention.{p}.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight", "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),  # the GELU branch
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),  # the linear branch
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkvo])")
    return re.compile(pattern)


_WAN_TO_HF = [(_template_regex(wan), hf) for wan, hf in _KEY_PAIRS]
_HF_TO_WAN = [(_template_regex(hf), wan) for wan, hf in _KEY_PAIRS]


def _translate(key: str, table) -> str | None:
    for regex, target in table:
        m = regex.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


def wan_key_to_hf(key: str) -> str | None:
    """The transformers name of a Wan T5 key, or None for a key Wan's encoder does not have."""
    return _translate(key, _WAN_TO_HF)


def hf_key_to_wan(key: str) -> str | None:
    """The Wan name of a transformers UMT5-encoder key (inverse of ``wan_key_to_hf``)."""
    return _translate(key, _HF_TO_WAN)


def _torch_load(path: Path) -> dict:
    try:  # mmap: tensors are paged in as they are moved, not read into RAM up front
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_wan_t5(path: str | Path, size: UMT5Size = UMT5_XXL, *, device="cpu", dtype=torch.bfloat16,
                attn_implementation: str = "sdpa") -> UMT5EncoderModel:
    """Load Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (a plain state dict of ``T5Encoder``) strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UMT5 checkpoint not found: {path}")
    state = _torch_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict of tensors (got {type(state).__name__})")
    model = build_umt5_meta(size.hf_config(attn_implementation), dtype)
    expected_wan = {hf_key_to_wan(k): s for k, s in expected_shapes(model).items()}
    check_keys(str(path), {k: tuple(v.shape) for k, v in state.items()}, expected_wan)
    assign_weights(model, {wan_key_to_hf(k): v for k, v in state.items()}, device=device, dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------- transformers format
_SEQ2SEQ_EXTRAS = ("decoder.", "lm_head.")  # present in full UMT5 checkpoints; the encoder does not use them


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (found: {sorted(p.name for p in folder.iterdir())})")
    return files


def read_hf_size(folder: str | Path) -> UMT5Size:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not a transformers model folder: config.json is missing")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "umt5":
        # T5 v1.1 differs (relative bias only in layer 0); loading it here would silently compute something else
        raise CheckpointMismatchError(f"{cfg_path}: model_type {raw.get('model_type')!r}, expected 'umt5'")
    return UMT5Size.from_hf_config(UMT5Config.from_dict(raw))


def load_hf_umt5(folder: str | Path, *, device="cpu", dtype=torch.bfloat16,
                 attn_implementation: str = "sdpa") -> UMT5EncoderModel:
    """Load a transformers/diffusers UMT5 folder (``config.json`` + safetensors, sharded or not) strictly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    size = read_hf_size(folder)
    state: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        state.update(load_file(f, device="cpu"))  # memory-mapped until moved
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state = {k: v for k, v in state.items()
             if k != "encoder.embed_tokens.weight" and not k.startswith(_SEQ2SEQ_EXTRAS)}
    model = build_umt5_meta(size.hf_config(attn_implementation), dtype)
    check_keys(str(folder), {k: tuple(v.shape) for k, v in state.items()}, expected_shapes(model))
    assign_weights(model, state, device=device, dtype=dtype)
    return model
