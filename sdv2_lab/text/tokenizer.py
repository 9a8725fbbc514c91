"""The UMT5 tokenizer: loading a local ``google/umt5-xxl`` folder, Wan's text cleaning, fixed-length batches.

Required files in a tokenizer folder: ``tokenizer_config.json`` (it names the tokenizer class and the pad/eos
tokens; without it transformers falls back to a generic tokenizer that cannot pad) and the vocabulary as
``tokenizer.json`` (fast) or ``spiece.model`` (SentencePiece, converted on load). ``special_tokens_map.json``
is read when present but not required. Nothing is ever downloaded (``local_files_only=True``).
"""
from __future__ import annotations

import html
import logging
import string
from pathlib import Path

import ftfy
import regex  # the reference cleans with `regex`, whose \s is Unicode White_Space (differs from `re` on a few chars)
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_FILES = ("tokenizer.json", "spiece.model")
WAN_TOKENIZER_SUBDIR = "google/umt5-xxl"


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def missing_tokenizer_files(folder: Path) -> list[str]:
    missing = [] if (folder / TOKENIZER_CONFIG).is_file() else [TOKENIZER_CONFIG]
    if not any((folder / f).is_file() for f in VOCAB_FILES):
        missing.append(" or ".join(VOCAB_FILES))
    return missing


class PromptTokenizer:
    """Cleans prompts and turns them into ``[B, max_length]`` ids + mask, padded and truncated as Wan does."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 512, source: str = "<memory>"):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer from {source} has no pad or eos token")
        self.tokenizer, self.max_length, self.source = tokenizer, max_length, source

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 512) -> "PromptTokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        missing = missing_tokenizer_files(folder)
        if missing:
            raise FileNotFoundError(f"tokenizer folder {folder} lacks {missing} "
                                    f"(has: {sorted(p.name for p in folder.iterdir())})")
        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), max_length, str(folder))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # incl. added tokens: every id the tokenizer can emit is below this

    def clean(self, prompts: str | list[str]) -> list[str]:
        """Cleaned prompts; an empty or whitespace-only prompt is a ``ValueError``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        cleaned = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str")
            c = clean_prompt(p)
            if not c:
                raise ValueError(f"prompt {i} is empty after cleaning ({p!r}): give a text describing the video")
            cleaned.append(c)
        return cleaned

    def __call__(self, cleaned: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask ``[B, max_length]`` (``</s>`` appended, pad = 0) for already-cleaned texts."""
        self._warn_if_truncated(cleaned)
        out = self.tokenizer(cleaned, padding="max_length", truncation=True, max_length=self.max_length,
                             add_special_tokens=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def _warn_if_truncated(self, cleaned: list[str]) -> None:
        counts = self.tokenizer(cleaned, add_special_tokens=True, truncation=False)["input_ids"]
        for i, ids in enumerate(counts):
            if len(ids) > self.max_length:
                log.warning("prompt %d has %d tokens (with </s>), more than the text encoder's %d: truncated to "
                            "%d tokens; the rest of the prompt is ignored (%.60r...)",
                            i, len(ids), self.max_length, self.max_length, cleaned[i])


def synthetic_tokenizer(max_length: int = 512) -> PromptTokenizer:
    """A small character-level T5 tokenizer made in memory: for dummy-weight runs and tests with no files.

    Ids: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in UMT5, then ``▁`` and printable ASCII (+ a few common words),
    so different prompts get different ids. It is not UMT5's vocabulary; token counts run ~3x higher.
    """
    from transformers import T5Tokenizer

    words = ["a", "the", "of", "and", "in", "on", "with", "cat", "dog", "man", "woman", "city", "style", "video"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + w, -3.0) for w in words]
    return PromptTokenizer(T5Tokenizer(vocab=vocab, extra_ids=0), max_length, "<synthetic>")
