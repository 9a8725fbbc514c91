"""CLIP metrics over a local transformers CLIP folder (the paper: openai/clip-vit-base-patch32).

* ``clip_consistency`` (the paper's "CLIP Score", Table 1): 100 x mean cosine similarity between the CLIP image
  embeddings of consecutive *output* frames. StreamV2V's ``tools/clip_score.py``, which the paper's evaluation
  copies, computes exactly this.
* ``clip_score``: prompt-frame alignment, 100 x max(cos(image, text), 0) averaged over output frames (the usual
  CLIPScore definition; NaN when there is no prompt).

torchmetrics' CLIPScore is not used: with transformers 5 ``get_image_features`` returns a ModelOutput, which
torchmetrics 1.9.0 cannot handle.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

import torch

from .base import (NAN, MetricUnavailable, check_frames, device_of, existing_path, register_metric, section)

CLIP_KEY = "metrics.clip.weights"
CLIP_HOW = "A local CLIP folder: `hf download openai/clip-vit-base-patch32` (docs/metrics.md)."


def _embeddings(output) -> torch.Tensor:
    """get_*_features returns a Tensor (transformers 4) or a ModelOutput whose pooler_output is the projected
    embedding (transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__} without pooler_output")
    return pooled


class ClipEncoder:
    """Unit-norm CLIP image and text embeddings from a local folder (never downloads)."""

    def __init__(self, folder: str, device: torch.device | str = "cpu", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MetricUnavailable(f"could not load CLIP from {folder} ({CLIP_KEY}): {err}. {CLIP_HOW}",
                                    config_key=CLIP_KEY, path=folder) from err
        if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        else:  # a folder without the processor file: CLIP's standard preprocessing at the model's resolution
            side = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": side},
                                                crop_size={"height": side, "width": side})
        self.max_text_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [T, 3, H, W] in [0, 1] -> [T, D] unit-norm image embeddings."""
        embeddings = []
        for batch in frames.split(self.batch_size):
            # the processor resizes (bicubic, shortest edge), centre-crops and normalises a whole batch at once
            pixels = self.processor(images=batch.float().clamp(0, 1).cpu(), do_rescale=False,
                                    return_tensors="pt")["pixel_values"].to(self.device)
            embeddings.append(_embeddings(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        """text -> [D] unit-norm text embedding (truncated to CLIP's context length)."""
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt").to(self.device)
        features = _embeddings(self.model.get_text_features(**tokens)).float()
        return torch.nn.functional.normalize(features, dim=-1)[0]


def load_clip_encoder(weights: Optional[str], device: torch.device | str = "cpu", batch_size: int = 32) -> ClipEncoder:
    folder = existing_path(weights, config_key=CLIP_KEY, what="CLIP weights folder", how=CLIP_HOW,
                           example="clip-vit-base-patch32")
    return ClipEncoder(folder, device=device, batch_size=batch_size)


class ClipConsistency:
    """100 x mean cos(e_t, e_{t+1}) over consecutive output frames' CLIP image embeddings (the paper's score)."""

    name = "clip_consistency"

    def __init__(self, encoder: ClipEncoder):
        self.encoder = encoder

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        if outputs.shape[0] < 2:
            return {self.name: NAN}
        emb = self.encoder.embed_frames(outputs)
        return {self.name: float(100 * (emb[:-1] * emb[1:]).sum(-1).mean())}


class ClipPromptScore:
    """CLIPScore: 100 x max(cos(frame, prompt), 0), averaged over output frames; NaN without a prompt."""

    name = "clip_score"

    def __init__(self, encoder: ClipEncoder):
        self.encoder = encoder

    def __call__(self, inputs, outputs, prompt=None) -> dict[str, float]:
        check_frames(inputs, outputs)
        if not prompt:
            return {self.name: NAN}
        cos = self.encoder.embed_frames(outputs) @ self.encoder.embed_text(prompt)
        return {self.name: float((100 * cos.clamp(min=0)).mean())}


def _shared_encoder(cfg: Mapping, shared: dict) -> ClipEncoder:
    clip_cfg = section(cfg, "clip")
    key = ("clip", clip_cfg.get("weights"), str(device_of(cfg)))
    if key not in shared:
        shared[key] = load_clip_encoder(clip_cfg.get("weights"), device_of(cfg), clip_cfg.get("batch_size", 32))
    return shared[key]


@register_metric("clip_consistency")
def _build_clip_consistency(cfg: Mapping, shared: dict) -> ClipConsistency:
    return ClipConsistency(_shared_encoder(cfg, shared))


@register_metric("clip_score")
def _build_clip_score(cfg: Mapping, shared: dict) -> ClipPromptScore:
    return ClipPromptScore(_shared_encoder(cfg, shared))
