"""sdv2_lab.metrics: known answers on synthetic clips, with tiny random networks written in the loaders' real
file formats (no pretrained weights exist offline)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sdv2_lab.metrics import (DISFlow, LPIPSDistance, MetricUnavailable, RAFTFlow, WarpError, available_metrics,
                              build_metrics, consistent_flow_mask, warp_error)
from sdv2_lab.metrics.clip import _embeddings

CONF = Path(__file__).resolve().parents[1] / "conf" / "metrics"
ALL_METRICS = ["clip_consistency", "clip_score", "lpips", "warp_error", "flicker", "ssim", "psnr", "vae_fidelity"]


# ------------------------------------------------------------------------------------------------ fixtures

def textured_clip(frames: int = 4, height: int = 64, width: int = 96, dx: int = 3, dy: int = 2, seed: int = 0):
    """A smooth random texture seen through a window moving by (dx, dy) px per frame: the content moves by
    (-dx, -dy), so flow(t -> t+1) = (-dx, -dy) everywhere it is defined."""
    g = torch.Generator().manual_seed(seed)
    canvas = torch.rand(1, 3, height + frames * dy + 16, width + frames * dx + 16, generator=g)
    canvas = F.avg_pool2d(canvas, 5, 1, 2)    # smooth enough for sub-pixel flow, still textured everywhere
    canvas = (canvas - canvas.amin()) / (canvas.amax() - canvas.amin())
    return torch.stack([canvas[0, :, 8 + t * dy:8 + t * dy + height, 8 + t * dx:8 + t * dx + width]
                        for t in range(frames)])


def static_clip(frames: int = 3, height: int = 64, width: int = 64):
    return textured_clip(1, height, width)[0:1].repeat(frames, 1, 1, 1)


def metrics_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "default.yaml")
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised CLIP saved like openai/clip-vit-base-patch32: model, byte-level BPE tokenizer,
    image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    folder = tmp_path_factory.mktemp("tiny_clip")
    byte_chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:   # every byte, inside and at the end of a word
        vocab[token] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    """A torchvision-format AlexNet state dict (random weights; classifier keys included, as in the real file)."""
    from torchvision.models import alexnet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def raft_small_file(tmp_path_factory) -> Path:
    """A torchvision RAFT-small state dict whose flow head outputs zero: the flow is exactly 0, a known answer
    that also proves the file was loaded (random weights would give a non-zero flow)."""
    from torchvision.models.optical_flow import raft_small
    torch.manual_seed(0)
    model = raft_small(weights=None)
    torch.nn.init.zeros_(model.update_block.flow_head.conv2.weight)
    torch.nn.init.zeros_(model.update_block.flow_head.conv2.bias)
    path = tmp_path_factory.mktemp("raft") / "raft_small_C_T_V2-01064c6d.pth"
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------ registry and config

def test_registry_has_every_metric_and_rejects_unknown_names():
    assert available_metrics() == sorted(ALL_METRICS)
    with pytest.raises(ValueError, match="valid metrics") as err:
        build_metrics({"enabled": ["psnr", "fvd"]})
    assert "fvd" in str(err.value) and all(name in str(err.value) for name in ALL_METRICS)


def test_default_config_runs_weight_free_metrics_and_explains_the_rest():
    metrics, unavailable = build_metrics(OmegaConf.load(CONF / "default.yaml"))
    assert [m.name for m in metrics] == ["warp_error", "flicker", "ssim", "psnr"]
    assert isinstance(metrics[0].flow, DISFlow)   # flow: auto without raft weights
    assert set(unavailable) == {"clip_consistency", "clip_score", "lpips"}
    assert "metrics.clip.weights=/path/to/clip-vit-base-patch32" in unavailable["clip_score"]
    assert "metrics.lpips.backbone_weights=/path/to/alexnet-owt-7be5be79.pth" in unavailable["lpips"]
    assert "hf download openai/clip-vit-base-patch32" in unavailable["clip_consistency"]   # how to obtain it
    video = textured_clip(3, 32, 48)
    scores = {}
    for metric in metrics:
        scores.update(metric(video, video.flip(-1), "a prompt"))
    assert set(scores) == {"warp_error_uint8", "warp_error_float", "warp_error_valid_frac", "flicker",
                           "output_frame_diff", "ssim", "psnr"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())


def test_none_and_paper_configs():
    assert build_metrics(OmegaConf.load(CONF / "none.yaml")) == ([], {})
    paper = OmegaConf.load(CONF / "paper.yaml")
    assert list(paper.enabled) == ["clip_consistency", "warp_error"] and list(paper.warp.variants) == ["uint8"]
    metrics, unavailable = build_metrics(paper)
    assert metrics == [] and set(unavailable) == {"clip_consistency", "warp_error"}
    # flow: raft never falls back to DIS
    assert "metrics.warp.raft_weights=/path/to/raft_large_C_T_SKHT_V2-ff5fadd5.pth" in unavailable["warp_error"]


def test_missing_weight_files_name_the_path_and_the_rest_still_build(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = metrics_cfg(clip={"weights": str(missing / "clip-vit-base-patch32")},
                      lpips={"backbone_weights": str(missing / "alexnet-owt-7be5be79.pth")},
                      warp={"flow": "raft", "raft_weights": str(missing / "raft.pth")})
    metrics, unavailable = build_metrics(cfg)
    assert [m.name for m in metrics] == ["flicker", "ssim", "psnr"]
    assert str(missing / "clip-vit-base-patch32") in unavailable["clip_consistency"]
    assert str(missing / "alexnet-owt-7be5be79.pth") in unavailable["lpips"]
    assert str(missing / "raft.pth") in unavailable["warp_error"]
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth") as err:
        LPIPSDistance(str(missing / "alexnet-owt-7be5be79.pth"))
    assert err.value.config_key == "metrics.lpips.backbone_weights"
    with pytest.raises(MetricUnavailable, match="metrics.warp.raft_weights"):
        RAFTFlow(None)


def test_frames_are_validated():
    video = static_clip(2, 16, 16)
    metrics, _ = build_metrics({"enabled": ["psnr"]})
    with pytest.raises(ValueError, match="same shape"):
        metrics[0](video, video[:1])
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        metrics[0](video[:, :2], video[:, :2])


# ------------------------------------------------------------------------------------------------------ CLIP

def test_clip_consistency_and_prompt_score(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    metrics, unavailable = build_metrics(metrics_cfg(enabled=["clip_consistency", "clip_score"],
                                                     clip={"weights": str(tiny_clip_dir), "batch_size": 2}))
    assert unavailable == {}
    consistency, prompt_score = metrics
    assert consistency.encoder is prompt_score.encoder   # CLIP is loaded once per build_metrics

    static = static_clip(3, 40, 56)
    assert consistency(static, static)["clip_consistency"] == pytest.approx(100.0, abs=1e-3)

    # known answer from the HF model called directly (its forward's image_embeds / text_embeds)
    moving = textured_clip(5, 40, 56, dx=6, dy=4)
    model = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(images=moving, do_rescale=False,
                                                                return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(["a red car"], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    image = F.normalize(out.image_embeds, dim=-1)
    text = F.normalize(out.text_embeds, dim=-1)[0]
    expected_consistency = 100 * (image[:-1] * image[1:]).sum(-1).mean()
    expected_score = (100 * (image @ text).clamp(min=0)).mean()
    got = consistency(moving, moving)["clip_consistency"]
    assert got == pytest.approx(float(expected_consistency), abs=1e-3) and got < 100 - 1e-3
    assert prompt_score(moving, moving, "a red car")["clip_score"] == pytest.approx(float(expected_score), abs=1e-3)
    assert math.isnan(prompt_score(moving, moving, None)["clip_score"])


def test_clip_features_accept_tensor_or_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    embeds = torch.randn(2, 4)
    assert _embeddings(embeds) is embeds                                                  # transformers 4
    assert _embeddings(BaseModelOutputWithPooling(pooler_output=embeds)) is embeds        # transformers 5


def test_incomplete_clip_folder_is_unavailable(tmp_path):
    (tmp_path / "clip").mkdir()
    _, unavailable = build_metrics(metrics_cfg(enabled=["clip_score"], clip={"weights": str(tmp_path / "clip")}))
    assert str(tmp_path / "clip") in unavailable["clip_score"]


# ----------------------------------------------------------------------------------------------------- LPIPS

def test_lpips_loads_the_torchvision_backbone(alexnet_file):
    metric = LPIPSDistance(str(alexnet_file))
    state = torch.load(alexnet_file, weights_only=True)
    for slice_name, index in [("slice1", 0), ("slice2", 3), ("slice3", 6), ("slice4", 8), ("slice5", 10)]:
        layer = getattr(getattr(metric.model.net, slice_name), str(index))   # lpips keeps torchvision indices
        assert torch.equal(layer.weight, state[f"features.{index}.weight"])
        assert torch.equal(layer.bias, state[f"features.{index}.bias"])


def test_lpips_known_answers(alexnet_file):
    metric, = build_metrics(metrics_cfg(enabled=["lpips"], lpips={"backbone_weights": str(alexnet_file)}))[0]
    video = textured_clip(2, 64, 64)
    assert metric(video, video)["lpips"] == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(1))
    values = [metric(video, (video + level * noise).clamp(0, 1))["lpips"] for level in (0.02, 0.08, 0.3)]
    assert 0 < values[0] < values[1] < values[2], values


def test_lpips_rejects_a_file_that_is_not_the_backbone(tmp_path):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision alex backbone"):
        LPIPSDistance(str(path))


# ------------------------------------------------------------------------------------------------ warp error

def test_identical_frames_have_zero_warp_error_with_dis_and_raft(raft_small_file):
    video = static_clip(3, 64, 64)
    dis_metric, = build_metrics(metrics_cfg(enabled=["warp_error"], warp={"flow": "dis"}))[0]
    raft_metric, = build_metrics(metrics_cfg(enabled=["warp_error"],
                                             warp={"raft_weights": str(raft_small_file), "raft_iters": 2}))[0]
    assert isinstance(raft_metric.flow, RAFTFlow) and raft_metric.flow.arch == "small"   # auto: raft, detected
    for metric in (dis_metric, raft_metric):
        scores = metric(video, video)
        assert scores["warp_error_uint8"] == pytest.approx(0.0, abs=1e-3)
        assert scores["warp_error_float"] == pytest.approx(0.0, abs=1e-3)
        assert scores["warp_error_valid_frac"] > 0.99
    forward, backward = raft_metric.input_flows(video)
    assert forward.shape == backward.shape == (2, 2, 64, 64)   # padded to 128 for RAFT, cropped back
    assert forward.abs().max() == 0 and backward.abs().max() == 0
    streamv2v = WarpError(DISFlow(), occlusion="streamv2v")
    assert streamv2v(video, video)["warp_error_uint8"] == pytest.approx(0.0, abs=1e-3)


def test_dis_recovers_a_global_translation():
    video = textured_clip(4, 64, 96, dx=3, dy=2)
    flow = DISFlow("medium")
    forward, backward = flow(video[:-1], video[1:]), flow(video[1:], video[:-1])
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))   # away from the border strips
    assert forward[interior][:, 0].median() == pytest.approx(-3.0, abs=0.1)
    assert forward[interior][:, 1].median() == pytest.approx(-2.0, abs=0.1)
    assert backward[interior][:, 0].median() == pytest.approx(3.0, abs=0.1)
    assert backward[interior][:, 1].median() == pytest.approx(2.0, abs=0.1)
    # The input warped by its own flow: measured 0.68 (float, 0-255) with DIS medium here (0.5-0.8 at other
    # sizes; 2.4-2.8 with the fast presets), from the sub-pixel flow error (<= 0.15 px inside) on a texture
    # with steep gradients. Ignoring the motion (zero flow) gives 24.7 and flows of the wrong
    # direction 28.0, so < 2 separates "flow recovered" from "flow wrong" with margin on both sides.
    own = WarpError(flow)(video, video)
    unwarped = warp_error(video, torch.zeros_like(forward), torch.zeros_like(backward))
    assert own["warp_error_float"] < 2.0 < 10 < unwarped["warp_error_float"]
    # pixels entering across the border fail the occlusion check: about (3/96 + 2/64) of the frame
    assert own["warp_error_valid_frac"] == pytest.approx(1 - 3 / 96 - 2 / 64, abs=0.03)


def test_occlusion_mask_of_an_exact_translation():
    h, w = 20, 30
    forward = torch.tensor([-3.0, -2.0])[None, :, None, None].expand(1, 2, h, w)
    backward = -forward
    valid = consistent_flow_mask(backward, forward)   # on frame t+1's grid: valid where p + b is inside frame t
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[:h - 2, :w - 3] = True
    assert torch.equal(valid[0], expected)


def test_uint8_variant_wraps_around_and_float_does_not():
    base = 0.2 + 0.6 * textured_clip(1, 24, 32)[0]
    base = (base * 255).round() / 255                        # exactly representable in uint8
    step = 10 / 255
    zero = torch.zeros(2, 2, 24, 32)
    darker = torch.stack([base, base - step, base - 2 * step])
    brighter = torch.stack([base, base + step, base + 2 * step])
    no_wrap = warp_error(darker, zero, zero)                 # warped - next = +10: no wrap-around
    assert no_wrap["warp_error_uint8"] == pytest.approx(10.0, abs=1e-3)
    assert no_wrap["warp_error_float"] == pytest.approx(10.0, abs=1e-3)
    wraps = warp_error(brighter, zero, zero)                 # warped - next = -10 -> 246 in uint8
    assert wraps["warp_error_float"] == pytest.approx(10.0, abs=1e-3)
    assert wraps["warp_error_uint8"] == pytest.approx(246.0, abs=1e-3)
    # the same through an exact integer translation: the warp itself is exact, so the variants agree again
    moving = textured_clip(3, 24, 32, dx=2, dy=1)
    moving = (moving * 255).round() / 255
    forward = torch.tensor([-2.0, -1.0])[None, :, None, None].repeat(2, 1, 24, 32)
    darker_moving = moving - torch.tensor([0.0, 1.0, 2.0])[:, None, None, None] * (3 / 255)
    shifted = warp_error(darker_moving.clamp(0, 1), forward, -forward)
    assert shifted["warp_error_uint8"] == pytest.approx(shifted["warp_error_float"], abs=0.05)


# ------------------------------------------------------------------------------------ flicker, ssim, psnr

def test_flicker_known_values():
    metrics, _ = build_metrics({"enabled": ["flicker"]})
    flicker = metrics[0]
    video = 0.25 + 0.5 * textured_clip(4, 16, 16)
    assert flicker(video, video) == {"flicker": pytest.approx(0.0, abs=1e-4),
                                     "output_frame_diff": pytest.approx(float((video.diff(dim=0) * 255).abs().mean()))}
    static = video[:1].repeat(4, 1, 1, 1)
    alternating = static + (10 / 255) * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None, None, None]
    scores = flicker(static, alternating)   # every output step is +-20 levels that the input does not have
    assert scores["flicker"] == pytest.approx(20.0, abs=1e-3)
    assert scores["output_frame_diff"] == pytest.approx(20.0, abs=1e-3)


def test_ssim_and_psnr():
    metrics, _ = build_metrics({"enabled": ["ssim", "psnr"]})
    ssim, psnr = metrics
    video = textured_clip(3, 32, 32)
    assert ssim(video, video)["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert psnr(video, video)["psnr"] == math.inf
    flat = torch.full_like(video, 0.5)
    assert psnr(flat, flat + 0.1)["psnr"] == pytest.approx(20.0, abs=1e-3)   # MSE 0.01 -> 20 dB
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(2))
    noisy = [(video + level * noise).clamp(0, 1) for level in (0.2, 0.1, 0.05)]
    psnrs = [psnr(video, x)["psnr"] for x in noisy]
    ssims = [ssim(video, x)["ssim"] for x in noisy]
    assert psnrs[0] < psnrs[1] < psnrs[2] and ssims[0] < ssims[1] < ssims[2] < 1
