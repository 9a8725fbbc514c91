"""TAEHV, the tiny video autoencoder for Wan2.1 latents (``taew2_1.pth``, reference §1.12), with streaming that
keeps its per-layer memory between chunks.

TAEHV is 2-D convs plus ``MemBlock``s that also see the *previous frame's* input of the same block. The
reference re-decodes up to 3 latents of context with every new latent (starting from zero memory, 4x the
work, and not equal to a one-shot decode). Here each MemBlock's last input frame is kept in the stream's
cache, so decoding chunk by chunk equals one-shot decoding of the whole latent sequence and costs one
latent's work per latent.

Frame accounting. TAEHV decodes each latent to 4 frames (``TGrow`` x2 x2). Wan latent 0 stands for frame 0
alone, so upstream TAEHV trims the first ``frames_to_trim = 3`` frames of a decode. We do the same on a
stream's first call: F latents -> 4F - 3 = 1 + 4(F - 1) frames (2 latents -> 5 frames, exactly as the Wan VAE),
later calls 4F frames. The reference instead drops all 4 frames of latent 0 on its first call (2 latents ->
4 frames: our first-chunk frames [1:5]; the first input frame is lost, §5 item 21) and its later chunks
differ from ours slightly because its context window restarts TAEHV's memory from zero.

Output: TAEHV produces ~[0, 1]; we return ``2x - 1`` clamped to [-1, 1] (float32), as the reference.

Latent spaces. The DiT sees what the Wan encoder gives it (raw mu unless ``normalize_on_encode``: reference
§1.11) and its output is read as normalised latents (``denormalize_on_decode``: the Wan decoder applies
z * std + mean). A TAE was trained in one of the two spaces (``latent_space``): ``taew2_1.pth`` in the
normalised one (the reference feeds it the DiT output as is), LightX2V's ``lighttaew2_1.pth`` in the raw one
(Scope and LightX2V de-normalise before its decoder and normalise after its encoder). ``TAEHVVAE`` converts
between the TAE's space and the DiT's, so that every VAE hands the DiT the same kind of latent.

The pipeline VAE ``TAEHVVAE`` (registry name ``taehv``) encodes with the Wan VAE (the reference's choice;
``encoder="taehv"`` uses TAEHV's own encoder instead: a stream's first frame is repeated 4x so that frame 0
maps to its own latent) and decodes with TAEHV. Like the Wan VAE it encodes / decodes several streams in one
call (``encode_streams`` / ``decode_streams``, each stream's MemBlock memory a row of the batch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoints import materialize, read_state_dict
from ..units import to_unit
from .registry import check_latents, check_video, register_vae
from .state import Batch, StreamCache, check_same_phase, one_size, release_graphs, restart_parts
from .wan_vae import ARCH_KEYS, LATENT_MEAN, LATENT_STD, OPTION_KEYS, WanVAE, WanVAEState

log = logging.getLogger(__name__)


def conv(cin: int, cout: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """conv(concat(x, previous frame's x)) + skip(x), ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv(cin * 2, cout), nn.ReLU(inplace=True), conv(cout, cout), nn.ReLU(inplace=True),
                                  conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merge ``stride`` consecutive frames (stacked on channels) with a 1x1 conv."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c * stride, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """Split each frame into ``stride`` frames with a 1x1 conv to ``c * stride`` channels."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


def run_with_memory(layers: nn.Sequential, x: torch.Tensor, cache) -> torch.Tensor:
    """Run [B, T, C, H, W] through ``layers``, all T frames at once; each MemBlock's memory of the previous
    frame comes from ``cache`` (a ``state.Batch`` or one stream's ``StreamCache``; zeros at a stream's start)
    and is replaced by this chunk's last frame."""
    cache = cache if isinstance(cache, Batch) else Batch([cache])
    b = x.shape[0]
    x = x.flatten(0, 1)
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            frames = x.unflatten(0, (b, -1))
            past = torch.cat([cache.history(i, frames, 1, dim=1), frames[:, :-1]], 1).flatten(0, 1)
            cache.keep(i, frames[:, -1:])
            x = layer(x, past)
        else:
            x = layer(x)
    return x.unflatten(0, (b, -1))


class TAEHV(nn.Module):
    """The TAEHV module tree; ``state_dict`` keys equal ``taew2_1.pth`` (``encoder.<i>.*``, ``decoder.<i>.*``)."""
    latent_channels, image_channels = 16, 3

    def __init__(self, time_upscale: Sequence[bool] = (True, True), space_upscale: Sequence[bool] = (True, True, True)):
        super().__init__()
        c, z = 64, self.latent_channels
        self.encoder = nn.Sequential(
            conv(self.image_channels, c), nn.ReLU(inplace=True),
            TPool(c, 2), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            TPool(c, 2), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            TPool(c, 1), conv(c, c, stride=2, bias=False), MemBlock(c, c), MemBlock(c, c), MemBlock(c, c),
            conv(c, z))
        n = (256, 128, 64, 64)
        t1, t2 = (2 if u else 1 for u in time_upscale)
        s1, s2, s3 = (2 if u else 1 for u in space_upscale)
        self.frames_to_trim = t1 * t2 - 1  # the extra frames latent 0 decodes to (it stands for one frame)
        self.decoder = nn.Sequential(
            Clamp(), conv(z, n[0]), nn.ReLU(inplace=True),
            MemBlock(n[0], n[0]), MemBlock(n[0], n[0]), MemBlock(n[0], n[0]),
            nn.Upsample(scale_factor=s1), TGrow(n[0], 1), conv(n[0], n[1], bias=False),
            MemBlock(n[1], n[1]), MemBlock(n[1], n[1]), MemBlock(n[1], n[1]),
            nn.Upsample(scale_factor=s2), TGrow(n[1], t1), conv(n[1], n[2], bias=False),
            MemBlock(n[2], n[2]), MemBlock(n[2], n[2]), MemBlock(n[2], n[2]),
            nn.Upsample(scale_factor=s3), TGrow(n[2], t2), conv(n[2], n[3], bias=False),
            nn.ReLU(inplace=True), conv(n[3], self.image_channels))
        self.weights_are_dummy = False

    def patch_tgrow(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's TGrow weights are for x2 time upscaling; with upscaling off keep the last rows
        (the last of the grown frames), as the reference's ``patch_tgrow_layers``."""
        sd = dict(sd)
        for i, layer in enumerate(self.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > layer.conv.weight.shape[0]:
                sd[key] = sd[key][-layer.conv.weight.shape[0]:]
        return sd

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot: [B, F, 16, h, w] -> [B, 4F, 3, H, W] in ~[0, 1] (untrimmed, as the reference)."""
        return run_with_memory(self.decoder, latents.to(self.decoder[1].weight.dtype), StreamCache())

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """One-shot: [B, 4F, 3, H, W] in [0, 1] -> [B, F, 16, H/8, W/8]."""
        return run_with_memory(self.encoder, frames.to(self.encoder[0].weight.dtype), StreamCache())


@torch.no_grad()
def visible_dummy_(model: TAEHV) -> TAEHV:
    """Dummy weights that decode to visible noise. The generic dummy init keeps activations O(1) through the
    normalised stacks of the Wan models; TAEHV's decoder has no norms, so through its ~30 ReLU convs the output
    decays to ~0, which is a solid black frame (2x - 1 = -1) while the page says "noise". Twice the scale
    (He's gain for ReLU) and the last conv's bias at 0.5 give noise around mid grey (std ~0.25)."""
    for p in model.decoder.parameters():
        if p.dim() == 4:
            p.mul_(2.0)
    model.decoder[-1].bias.fill_(0.5)
    return model


def load_taehv(path: Optional[str | Path], *, dummy: bool = False, device="cpu", dtype=torch.float32,
               time_upscale: Sequence[bool] = (True, True), space_upscale: Sequence[bool] = (True, True, True)) -> TAEHV:
    def make():
        return TAEHV(time_upscale, space_upscale)
    if dummy:
        return visible_dummy_(materialize(make, None, "dummy", device, dtype))
    if path is None:
        raise ValueError("TAEHV needs vae.path or weights.taehv (a taew2_1.pth)")
    with torch.device("meta"):
        shapes = make()
    sd = shapes.patch_tgrow(read_state_dict(path))
    return materialize(make, sd, str(path), device, dtype)


@dataclass
class TAEHVState:
    """Per-stream state of ``TAEHVVAE``: the Wan encoder's state (or TAEHV encoder memory) and the TAEHV
    decoder's MemBlock memory."""
    wan: Optional[WanVAEState] = None
    enc: StreamCache = field(default_factory=StreamCache)
    dec: StreamCache = field(default_factory=StreamCache)
    frames_in: int = 0
    latents_in: int = 0
    size: Optional[tuple[int, int]] = None

    def restart(self, encoder: bool = True, decoder: bool = True) -> None:
        """Make this (its encoder's and/or decoder's part) a new stream's state in place, as ``WanVAEState.restart``."""
        if self.wan is not None:
            self.wan.restart(encoder, decoder)
        restart_parts(self, encoder, decoder)


LATENT_SPACES = ("raw", "normalized")


class TAEHVVAE(nn.Module):
    """Streaming VAE: Wan VAE encoder (or TAEHV's) + TAEHV decoder, the ``StreamingVAE`` interface.
    ``latent_space``: the space TAEHV's weights were trained in (see the module docstring); the two flags
    say the DiT's, as the Wan VAE's options do."""
    latent_channels, temporal_stride, spatial_stride = 16, 4, 8

    def __init__(self, taehv: TAEHV, wan: Optional[WanVAE] = None, *, latent_space: str = "normalized",
                 normalize_on_encode: bool = False, denormalize_on_decode: bool = True,
                 latents_mean: Sequence[float] = LATENT_MEAN, latents_std: Sequence[float] = LATENT_STD):
        super().__init__()
        if taehv.frames_to_trim != 3:
            raise ValueError("streaming needs TAEHV with x4 time upscaling (time_upscale=(True, True))")
        if latent_space not in LATENT_SPACES:
            raise ValueError(f"vae.latent_space must be one of {list(LATENT_SPACES)}, got {latent_space!r}")
        self.taehv, self.wan = taehv, wan
        self.latent_space = latent_space
        self.dit_in = "normalized" if normalize_on_encode else "raw"      # what the encoder hands the DiT
        self.dit_out = "normalized" if denormalize_on_decode else "raw"   # how the decoder reads the DiT's output
        self.latents_mean, self.latents_std = tuple(latents_mean), tuple(latents_std)
        self.weights_are_dummy = bool(taehv.weights_are_dummy or (wan is not None and wan.weights_are_dummy))
        self._steps = {"decode": self._decode_step, "encode": self._encode_step}  # accel.py may replace these

    def new_state(self, batch_size: int = 1) -> TAEHVState:
        return TAEHVState(wan=self.wan.new_state(batch_size) if self.wan is not None else None)

    def encode(self, state: TAEHVState, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> [B, F, 16, H/8, W/8] (same frame rules as the Wan VAE)."""
        return self.encode_streams([state], video)

    def decode(self, state: TAEHVState, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, 16, h, w] -> frames [B, T, 3, 8h, 8w] float32 in [-1, 1]; T = 4F - 3 on a stream's
        first call (TAEHV's warm-up frames of latent 0 trimmed), 4F afterwards."""
        return self.decode_streams([state], latents)

    @torch.no_grad()
    def encode_streams(self, states: list[TAEHVState], video: torch.Tensor) -> torch.Tensor:
        """One call for several streams: row i of ``video`` continues stream ``states[i]``."""
        if self.wan is not None:
            return self.wan.encode_streams([s.wan for s in states], video)
        first = check_same_phase(states, "frames_in")
        check_video(video, first, self.temporal_stride, self.spatial_stride)
        one_size(states, video.shape[-2:], "video")
        cache = Batch([s.enc for s in states])
        x = to_unit(video, self.taehv.encoder[0].weight.dtype).transpose(1, 2)
        for s in states:
            s.frames_in += video.shape[2]
        if first:  # frame 0 repeated to a group of 4 of its own -> its own latent
            x = torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1)
            z = self._encode_step(x, cache)
            cache.first = False
        else:
            z = self._steps["encode"](x, cache)
        return self._convert(z, self.latent_space, self.dit_in)

    @torch.no_grad()
    def decode_streams(self, states: list[TAEHVState], latents: torch.Tensor) -> torch.Tensor:
        """One call for several streams: row i of ``latents`` continues stream ``states[i]``."""
        check_latents(latents, self.latent_channels)
        first = check_same_phase(states, "latents_in")
        one_size(states, tuple(s * self.spatial_stride for s in latents.shape[-2:]), "latents (x8)")
        cache = Batch([s.dec for s in states])
        z = self._convert(latents, self.dit_out, self.latent_space).to(self.taehv.decoder[1].weight.dtype)
        if first:
            y = self._decode_step(z, cache)[:, self.taehv.frames_to_trim:]
            cache.first = False
        else:
            y = self._steps["decode"](z, cache)
        for s in states:
            s.latents_in += latents.shape[1]
        return y.float().mul_(2).sub_(1).clamp_(-1, 1)

    def release(self, state: TAEHVState) -> None:
        """The stream has ended: drop the CUDA graphs captured for batches that include it."""
        release_graphs(self._steps, [state], ("enc", "dec"))
        if self.wan is not None and state.wan is not None:
            self.wan.release(state.wan)

    def _convert(self, z: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """Latents [B, F, 16, h, w] from space ``src`` to ``dst`` (in float32, back in z's dtype)."""
        if src == dst:
            return z
        shape = (1, 1, self.latent_channels, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=z.device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=z.device).view(shape)
        out = z.float() * std + mean if src == "normalized" else (z.float() - mean) / std
        return out.to(z.dtype)

    def _decode_step(self, z: torch.Tensor, cache: Batch) -> torch.Tensor:
        return run_with_memory(self.taehv.decoder, z, cache)

    def _encode_step(self, x: torch.Tensor, cache: Batch) -> torch.Tensor:
        return run_with_memory(self.taehv.encoder, x, cache)


WAN_ENCODER_KEYS = tuple(k for k in ARCH_KEYS + OPTION_KEYS if k not in ("normalize_on_encode", "latents_mean",
                                                                             "latents_std")) + ("wan_path", "fused")


@register_vae("taehv")
def build_taehv_vae(*, path=None, taehv_path=None, wan_folder=None, encoder: str = "wan", dummy: bool = False,
                    device="cpu", dtype: torch.dtype = torch.float32, taehv_dtype=None, accelerate: str = "none",
                    latent_space: str = "normalized", normalize_on_encode: bool = False,
                    denormalize_on_decode: bool = True, source: Optional[str] = None, **wan_options) -> TAEHVVAE:
    """Registry entry ``taehv`` (``conf/vae/taehv*.yaml``, ``lighttae*.yaml``): TAEHV from ``path`` or the run's
    ``taehv_path``; with ``encoder: wan`` the Wan encoder from ``wan_path`` or ``wan_folder`` (``wan_options``:
    ``WanVAE`` options such as ``dim``; ``fused``: its fused path, see ``wan_fused.py``), with ``encoder:
    taehv`` TAEHV's own encoder (V2V with no Wan VAE at all; the Wan encoder's options are then unused, said
    once in the log). ``taehv_dtype``: TAEHV's dtype (default: ``dtype``), e.g. ``float16`` as upstream
    intends. ``latent_space``: raw | normalized, the space TAEHV's weights were trained in. ``source``: where
    the TAEHV file is configured, for the not-found message."""
    from .accel import accelerate_vae
    from .wan_builder import build_fast_wan_vae
    if encoder not in ("wan", "taehv"):
        raise ValueError(f"vae.encoder must be 'wan' or 'taehv', got {encoder!r}")
    unknown = sorted(set(wan_options) - set(WAN_ENCODER_KEYS))
    if unknown:
        raise ValueError(f"unknown TAEHV VAE options {unknown}; known: latent_space, normalize_on_encode, "
                         f"denormalize_on_decode, taehv_dtype, accelerate, encoder and the Wan encoder's "
                         f"{sorted(WAN_ENCODER_KEYS)}")
    if isinstance(taehv_dtype, str):
        taehv_dtype = getattr(torch, taehv_dtype)
    try:
        taehv = load_taehv(path or taehv_path, dummy=dummy, device=device, dtype=taehv_dtype or dtype)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (set by {source})" if source else str(exc)) from None
    wan = None
    if encoder == "wan":
        wan_path = wan_options.pop("wan_path", None)
        wan = build_fast_wan_vae(wan_path, wan_folder=wan_folder, dummy=dummy, device=device, dtype=dtype,
                                 accelerate=accelerate, normalize_on_encode=normalize_on_encode, **wan_options)
    elif wan_options:
        log.info("vae.encoder=taehv: the Wan encoder's options %s are not used", sorted(wan_options))
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    vae = TAEHVVAE(taehv, wan, latent_space=latent_space, normalize_on_encode=normalize_on_encode,
                   denormalize_on_decode=denormalize_on_decode)
    return accelerate_vae(vae, accelerate)
