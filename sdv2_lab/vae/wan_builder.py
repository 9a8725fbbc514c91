"""The Wan VAE as the registry builds it (``vae=wan``, ``vae=lightvae``): loaded, then its steady-state steps
fused (``wan_fused.py``) and/or accelerated (``accel.py``) as the options and the device say."""
from __future__ import annotations

from typing import Optional

import torch

from .registry import register_vae
from .wan_vae import WanVAE, load_wan_vae


def use_fused(fused, device, accelerate: str = "none") -> bool:
    """Resolve the ``fused`` option: true | false | auto (= on CUDA, unless ``accelerate: compile``, which
    traces the eager step)."""
    if isinstance(fused, str):
        if fused not in ("auto", "true", "false"):
            raise ValueError(f"vae.fused must be true, false or auto, got {fused!r}")
        fused = None if fused == "auto" else fused == "true"
    if fused is None:
        return torch.device(device).type == "cuda" and accelerate != "compile"
    if fused and accelerate == "compile":
        raise ValueError("vae.fused=true and vae.accelerate=compile exclude each other (compile traces the "
                         "eager step); use fused with accelerate none or cuda_graph")
    return bool(fused)


def build_fast_wan_vae(path=None, *, wan_folder=None, dummy: bool = False, device="cpu",
                       dtype: torch.dtype = torch.float32, accelerate: str = "none", fused="auto",
                       source: Optional[str] = None, **options) -> WanVAE:
    """A loaded ``WanVAE`` with its steady-state steps fused (``wan_fused.py``) and/or accelerated."""
    from .accel import accelerate_vae
    from .wan_fused import install_fused
    vae = load_wan_vae(path, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype, source=source,
                       **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed conv shapes per chunk: autotuning pays off
    if use_fused(fused, device, accelerate):
        install_fused(vae)
    return accelerate_vae(vae, accelerate)


@register_vae("wan")
def build_wan_vae(*, path=None, wan_folder=None, taehv_path=None, dummy: bool = False, device="cpu",
                  dtype: torch.dtype = torch.float32, accelerate: str = "none", fused="auto", source=None,
                  **options) -> WanVAE:
    """Registry entry ``wan`` (``conf/vae/wan.yaml``; ``lightvae.yaml`` is the same module at base width 24,
    its ``path`` the ``weights.lightvae`` file). ``taehv_path`` is part of the shared build context and unused
    here."""
    return build_fast_wan_vae(path, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype,
                              accelerate=accelerate, fused=fused, source=source, **options)
