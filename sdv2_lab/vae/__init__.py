"""Streaming VAEs behind one interface (``registry.StreamingVAE``): the Wan2.1 VAE and the TAEHV decoder.

    from sdv2_lab.vae import build_vae
    vae = build_vae(cfg.vae, wan_folder=..., taehv_path=..., dummy=False, device="cuda", dtype=torch.bfloat16)
    state = vae.new_state()
    z = vae.encode(state, video)    # [B, 3, T, H, W] -> [B, F, 16, H/8, W/8]
    x = vae.decode(state, z)        # -> [B, T, 3, H, W] in [-1, 1]
    zs = encode_streams(vae, [s0, s1], videos)   # several streams in one call (state.py)
"""
from .registry import (StreamingVAE, build_vae, decode_streams, encode_streams, register_vae,  # noqa: F401
                       registered_vaes, release)
from .wan_vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAEState, load_wan_vae  # noqa: F401
from .wan_builder import build_fast_wan_vae  # noqa: F401  (registers "wan")
from .taehv import TAEHV, TAEHVVAE, load_taehv  # noqa: F401,E402  (registers "taehv")
