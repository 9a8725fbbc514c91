"""Write a complete, tiny, randomly initialised checkpoint in the official StreamDiffusionV2 layout.

    python -m sdv2_lab.tiny_checkpoint /tmp/tiny      # then: checkpoint_folder="/tmp/tiny/ckpts/wan_causal_dmd_v2v"

    /tmp/tiny/wan_models/Wan2.1-T2V-1.3B/   config.json  diffusion_pytorch_model.safetensors  Wan2.1_VAE.pth
                                            models_t5_umt5-xxl-enc-bf16.pth  google/umt5-xxl/ (spiece.model, ...)
    /tmp/tiny/ckpts/wan_causal_dmd_v2v/model.pt
    /tmp/tiny/ckpts/taew2_1.pth  lightvaew2_1.pth  lighttaew2_1.safetensors

Every file has the official format and key names, at tiny sizes (a 2-layer DiT of width 256, a Wan VAE of base
width 16, a 2-layer UMT5 of width 4096 with a small SentencePiece vocabulary); TAEHV, LightVAE (the Wan VAE at
base width 24) and LightTAE (TAEHV's shapes) are small already and written at their published shapes, LightTAE
in the ``.safetensors`` container it is also published in. The real loading path runs on a CPU in seconds.
The weights are random, so the videos it makes are noise; it exists for trying the API and for the tests.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import torch

from .io.files import default_file_mode

DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
VAE_DIM = 16
LIGHTVAE_DIM = 24            # lightvaew2_1.pth: the Wan VAE with every width x 0.25 (plugins.md)
LIGHTVAE_FILE, LIGHTTAE_FILE = "lightvaew2_1.pth", "lighttaew2_1.safetensors"
T5 = dict(dim=4096, heads=2, head_dim=32, ffn=256, layers=2)   # width 4096: the DiT's text_embedding input
CORPUS = ["a watercolor painting of a moving red square", "a dog walks on the grass, realistic",
          "an oil painting in the style of van gogh", "a cat sitting on a mat, anime style",
          "cinematic shot of a city street at night, neon lights", "a sketch drawn with charcoal"] * 4


def write_tiny_checkpoint(root: str | Path, *, model_type: str = "T2V-1.3B", seed: int = 0) -> Path:
    """Write the layout above under ``root``; returns the checkpoint folder (``root/ckpts/wan_causal_dmd_v2v``)."""
    root = Path(root)
    wan = root / "wan_models" / f"Wan2.1-{model_type}"
    ckpt = root / "ckpts" / "wan_causal_dmd_v2v"
    for folder in (wan / "google" / "umt5-xxl", ckpt):
        folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    vocab = write_tokenizer(wan / "google" / "umt5-xxl")
    write_dit(wan, ckpt, gen)
    write_wan_vae(wan / "Wan2.1_VAE.pth", gen)
    write_t5(wan / "models_t5_umt5-xxl-enc-bf16.pth", vocab, seed)
    write_taehv(root / "ckpts" / "taew2_1.pth", gen)
    write_wan_vae(root / "ckpts" / LIGHTVAE_FILE, gen, dim=LIGHTVAE_DIM)
    write_taehv(root / "ckpts" / LIGHTTAE_FILE, gen)
    return ckpt


def _randomise(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A state dict with every tensor random at a fan-in scale (activations stay O(1))."""
    out = {}
    for name, t in module.state_dict().items():
        fan_in = t[0].numel() if t.dim() >= 2 else 1
        noise = torch.randn(t.shape, generator=gen) * (scale / fan_in ** 0.5)
        out[name] = (1 + noise) if name.endswith(("gamma", "norm_q.weight", "norm_k.weight", "norm3.weight")) else noise
    return out


def write_dit(wan: Path, ckpt: Path, gen: torch.Generator) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (Wan names) and the generator's ``model.pt``."""
    from .backbones.wan_dit import CausalWanDiT, WanDiTConfig
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "in_dim": 16,
              "out_dim": 16, "text_len": 512, "freq_dim": 256, "eps": 1e-6, "patch_size": [1, 2, 2],
              "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, **DIT}
    (wan / "config.json").write_text(json.dumps(config, indent=2))
    model = CausalWanDiT(WanDiTConfig(name="tiny", **DIT))
    model.init_weights(gen)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_safetensors(sd, wan / "diffusion_pytorch_model.safetensors")
    # StreamDiffusionV2's model.pt: the distilled generator under "generator", keys prefixed "model."
    generator = {f"model.{k}": v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    torch.save({"generator": generator}, ckpt / "model.pt")


def write_wan_vae(path: Path, gen: torch.Generator, dim: int = VAE_DIM) -> None:
    """A Wan VAE state dict (``Wan2.1_VAE.pth`` names; ``lightvaew2_1.pth`` at ``dim=24``)."""
    from .vae.wan_vae import WanVAE
    _save(_randomise(WanVAE(dim=dim), gen), path)


def write_taehv(path: Path, gen: torch.Generator) -> None:
    """A TAEHV state dict (``taew2_1.pth``; ``lighttaew2_1`` has the same names and shapes)."""
    from .vae.taehv import TAEHV
    _save(_randomise(TAEHV(), gen), path)


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A torch pickle, or a safetensors file for a ``.safetensors`` path (both containers are published)."""
    if Path(path).suffix == ".safetensors":
        save_safetensors(sd, path)
    else:
        torch.save(sd, path)


def save_safetensors(sd: dict, path: Path) -> None:
    """A state dict as ``.safetensors`` with the umask's file mode (safetensors itself writes 0600)."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    os.chmod(path, default_file_mode())


def write_t5(path: Path, vocab: int, seed: int) -> None:
    """Wan's ``T5Encoder`` state dict (bf16), made from a random transformers UMT5 renamed to Wan's keys."""
    from .text.umt5 import UMT5Size, build_umt5_dummy, hf_key_to_wan
    size = UMT5Size(vocab=vocab, **T5)
    model = build_umt5_dummy(size, device="cpu", dtype=torch.bfloat16, seed=seed)
    sd = {hf_key_to_wan(k): v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    torch.save(sd, path)


def write_tokenizer(folder: Path) -> int:
    """A SentencePiece unigram model trained on a few prompts, saved as a T5 tokenizer folder; returns its size."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=120,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                                                              "model_max_length": 512, **special}))
    processor = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return processor.get_piece_size()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m sdv2_lab.tiny_checkpoint <folder>", file=sys.stderr)
        return 2
    ckpt = write_tiny_checkpoint(argv[0])
    print(f"wrote a tiny random checkpoint (official layout; its videos are noise): checkpoint_folder={ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
