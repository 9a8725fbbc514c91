"""Registry entries: config (``conf/vae/*.yaml``) -> a ready streaming VAE."""
from __future__ import annotations

from pathlib import Path

from .base import materialize, read_state_dict, register_vae
from .wan import WanVAE

WAN_VAE_FILE = "Wan2.1_VAE.pth"


def _wan(opts, *, wan_folder, dummy, device, dtype):
    arch = dict(dim=opts.get("dim", 96), z_dim=16, dim_mult=tuple(opts.get("dim_mult", (1, 2, 4, 4))),
                num_res_blocks=opts.get("num_res_blocks", 2),
                normalize_on_encode=opts.get("normalize_on_encode", False),
                denormalize_on_decode=opts.get("denormalize_on_decode", True))
    if dummy:
        return materialize(lambda: WanVAE(**arch), None, "dummy", device, dtype)
    path = opts.get("path") or (Path(wan_folder) / WAN_VAE_FILE if wan_folder else None)
    if path is None:
        raise ValueError(f"the Wan VAE needs vae.path or weights.wan_folder (a folder holding {WAN_VAE_FILE})")
    return materialize(lambda: WanVAE(**arch), read_state_dict(path), str(path), device, dtype)


@register_vae("wan")
def build_wan(opts, *, wan_folder=None, taehv_path=None, dummy=False, device="cpu", dtype=None):
    return _wan(opts, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype)
