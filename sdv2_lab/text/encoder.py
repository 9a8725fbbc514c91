"""``TextEncoder``: prompts -> UMT5 embeddings ``[B, 512, D]`` with padding rows zeroed, as Wan's pipeline feeds the DiT.

Two things differ from the reference, neither changing the result:

* **Trimmed padding** (``trim_padding``, default on): the encoder runs only up to the longest real prompt in the
  batch, not all 512 positions. Padded keys are masked with the dtype's minimum (their softmax weight is exactly
  0) and the relative bias depends only on distances, so real rows are the same; padded rows are zero anyway.
* **Offload** (``offload=True``): the weights live in (pinned) CPU memory. The embedding lookup runs on the CPU,
  and each of the 24 blocks is copied to the compute device only while it runs and dropped right after (no
  copy back: the host copy is never modified). Peak GPU use is one block (~0.47 GB at XXL) instead of
  ~11.4 GB, at the cost of one host->device pass over the weights per *new* prompt (cached prompts cost nothing).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import UMT5EncoderModel

from .prompt_cache import PromptCache
from .tokenizer import TOKENIZER_CONFIG, WAN_TOKENIZER_SUBDIR, PromptTokenizer, synthetic_tokenizer
from .umt5 import UMT5_XXL, WAN_T5_CHECKPOINT, UMT5Size, build_umt5_dummy, load_hf_umt5, load_wan_t5

log = logging.getLogger(__name__)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BlockOffloader:
    """Keeps each block's parameters on the host; hooks put a device copy in place just for the block's forward.

    Parameters are swapped as whole ``Parameter`` objects (not ``.data``), so the host ones are restored as they
    were, and any device works, including "meta" (which the tests use to check the bookkeeping on a CPU box).
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.device = device
        self.blocks = blocks
        self.loads = 0  # host->device block transfers so far
        pin = device.type == "cuda"  # pinned memory makes the copies asynchronous; it needs CUDA
        self._host: dict[nn.Module, list[tuple[nn.Module, str, nn.Parameter]]] = {}
        for block in blocks:
            entries = []
            for owner in block.modules():
                for name, p in list(owner.named_parameters(recurse=False)):
                    host = p.detach().to("cpu")
                    host = nn.Parameter(host.pin_memory() if pin else host, requires_grad=False)
                    setattr(owner, name, host)
                    entries.append((owner, name, host))
            self._host[block] = entries
            block.register_forward_pre_hook(self._load)
            block.register_forward_hook(self._release)

    def _load(self, block: nn.Module, args) -> None:
        for owner, name, host in self._host[block]:
            setattr(owner, name, nn.Parameter(host.to(self.device, non_blocking=True), requires_grad=False))
        self.loads += 1

    def _release(self, block: nn.Module, args, output) -> None:
        for owner, name, host in self._host[block]:
            setattr(owner, name, host)  # the device copy is freed once the stream is done with it

    def release_all(self) -> None:
        for block in self.blocks:
            self._release(block, None, None)


class TextEncoder:
    """UMT5 text encoder with a prompt cache. ``encode(prompt) -> [B, text_len, dim]`` on ``device``."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PromptTokenizer, *, device: str | torch.device | None = None,
                 offload: bool = False, cache_size: int = 16, trim_padding: bool = True,
                 weights_are_dummy: bool = False):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the UMT5 "
                             f"embedding only {model.config.vocab_size}: tokenizer and weights do not belong together")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = model.shared.weight.dtype
        self.offload, self.trim_padding, self.weights_are_dummy = offload, trim_padding, weights_are_dummy
        self.cache = PromptCache(cache_size)
        self.offloader: BlockOffloader | None = None
        if offload:  # embedding table + blocks stay on the host; the final norm (one vector) lives on the device
            model.shared.to("cpu")
            self.offloader = BlockOffloader(model.encoder.block, self.device)
            model.encoder.final_layer_norm.to(self.device)
        else:
            model.to(self.device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_wan_folder(cls, folder: str | Path, *, device=None, dtype: torch.dtype = torch.bfloat16,
                        offload: bool = False, size: UMT5Size = UMT5_XXL, checkpoint: str = WAN_T5_CHECKPOINT,
                        tokenizer: str = WAN_TOKENIZER_SUBDIR, text_len: int = 512, dummy: bool = False,
                        seed: int = 0, attn_implementation: str = "sdpa", **kwargs) -> "TextEncoder":
        """From a Wan2.1 folder: ``<folder>/models_t5_umt5-xxl-enc-bf16.pth`` + ``<folder>/google/umt5-xxl/``.

        ``checkpoint``/``tokenizer`` may be absolute paths. ``dummy=True`` skips the checkpoint (random weights).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Wan folder not found: {folder}")
        tok = PromptTokenizer.from_folder(folder / tokenizer, text_len)
        device = torch.device(device) if device is not None else _default_device()
        home = torch.device("cpu") if offload else device
        if dummy:
            model = build_umt5_dummy(size, device=home, dtype=dtype, seed=seed, attn_implementation=attn_implementation)
        else:
            model = load_wan_t5(folder / checkpoint, size, device=home, dtype=dtype,
                                attn_implementation=attn_implementation)
        return cls(model, tok, device=device, offload=offload, weights_are_dummy=dummy, **kwargs)

    @classmethod
    def from_pretrained_dir(cls, model_dir: str | Path, *, tokenizer_dir: str | Path | None = None, device=None,
                            dtype: torch.dtype = torch.bfloat16, offload: bool = False, text_len: int = 512,
                            attn_implementation: str = "sdpa", **kwargs) -> "TextEncoder":
        """From a transformers/diffusers folder (``config.json`` + safetensors). The tokenizer is looked for in
        ``tokenizer_dir``, else ``model_dir`` itself, else the diffusers sibling ``model_dir/../tokenizer``."""
        model_dir = Path(model_dir)
        if tokenizer_dir is None:
            candidates = [model_dir, model_dir.parent / "tokenizer"]
            tokenizer_dir = next((c for c in candidates if (c / TOKENIZER_CONFIG).is_file()), model_dir)
        tok = PromptTokenizer.from_folder(tokenizer_dir, text_len)
        device = torch.device(device) if device is not None else _default_device()
        model = load_hf_umt5(model_dir, device="cpu" if offload else device, dtype=dtype,
                             attn_implementation=attn_implementation)
        return cls(model, tok, device=device, offload=offload, **kwargs)

    @classmethod
    def from_config(cls, size: UMT5Size = UMT5_XXL, *, dummy: bool = True, tokenizer_dir: str | Path | None = None,
                    device=None, dtype: torch.dtype = torch.bfloat16, offload: bool = False, text_len: int = 512,
                    seed: int = 0, attn_implementation: str = "sdpa", **kwargs) -> "TextEncoder":
        """Random weights at ``size`` (no files). Without ``tokenizer_dir`` a synthetic tokenizer is used."""
        if not dummy:
            raise ValueError("from_config makes random weights only (dummy=True); real weights come from "
                             "from_wan_folder or from_pretrained_dir")
        tok = PromptTokenizer.from_folder(tokenizer_dir, text_len) if tokenizer_dir else synthetic_tokenizer(text_len)
        device = torch.device(device) if device is not None else _default_device()
        # Random init is far faster on a GPU than on the host (5.7 B values at XXL); with offload the blocks then
        # move to pinned host memory in __init__, so only construction briefly holds the whole model there.
        model = build_umt5_dummy(size, device=device, dtype=dtype, seed=seed, attn_implementation=attn_implementation)
        return cls(model, tok, device=device, offload=offload, weights_are_dummy=True, **kwargs)

    # ------------------------------------------------------------------ encoding
    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @property
    def text_len(self) -> int:
        return self.tokenizer.max_length

    @torch.no_grad()
    def encode(self, prompt: str | list[str]) -> torch.Tensor:
        """``[B, text_len, dim]`` in the model's dtype on ``device``; rows past each prompt's tokens are 0."""
        texts = self.tokenizer.clean(prompt)
        rows = {t: self.cache.get(t) for t in dict.fromkeys(texts)}
        todo = [t for t, r in rows.items() if r is None]
        if todo:
            for t, r in zip(todo, self._encode_uncached(todo)):
                rows[t] = r
                self.cache.put(t, r)
        out = torch.zeros(len(texts), self.text_len, self.dim, device=self.device, dtype=self.dtype)
        for i, t in enumerate(texts):
            out[i, : rows[t].shape[0]] = rows[t]
        return out

    __call__ = encode

    def _encode_uncached(self, texts: list[str]) -> list[torch.Tensor]:
        """The real-token rows ``[n_i, dim]`` of each text."""
        ids, mask = self.tokenizer(texts)
        lengths = mask.sum(dim=1).tolist()
        if self.trim_padding:
            ids, mask = ids[:, : max(lengths)], mask[:, : max(lengths)]
        hidden = self._forward(ids, mask)
        return [hidden[i, :n].clone() for i, n in enumerate(lengths)]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.device)
        if self.offloader is None:
            return self.model(input_ids=ids.to(self.device), attention_mask=mask).last_hidden_state
        try:
            embeds = self.model.shared(ids).to(self.device, non_blocking=True)  # lookup on the host table
            return self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        finally:
            self.offloader.release_all()  # also after an error: never leave blocks on the device
