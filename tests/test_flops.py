"""The analytic FLOP model against the numbers printed in anchors.md §4.2–4.4, and the VAE walks against
torch's FLOP counter on the modules themselves.

Tolerance: every printed anchor value must be what our exact value rounds to at the printed precision, i.e.
|ours − printed| ≤ half a unit of the printed value's last digit (6.74 T → ±0.005 T; 475 FPS → ±0.5;
4.3 % → ±0.05 percentage points). The VAE walks must equal torch's count exactly.
"""
from decimal import Decimal

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab import flops as F

WAN_1_3B = WanDiTConfig(name="wan_1_3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_14B = WanDiTConfig(name="wan_14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
MODELS = {"1.3B": WAN_1_3B, "14B": WAN_14B}
RES = {"480p": (480, 832), "512": (512, 512)}
T = 1e12
PEAK = 800e12  # anchors §4.3/§4.4 use 800 TFLOP/s per H100


def assert_printed(value: float, printed: str, what: str = ""):
    """``value`` rounds to ``printed`` (half a unit of its last digit)."""
    decimals = -Decimal(printed).as_tuple().exponent
    tol = 0.5 * 10 ** -decimals + 1e-9
    assert abs(value - float(printed)) <= tol, f"{what}: ours {value:.6g}, anchors print {printed} (±{tol:g})"


def test_tokens_per_frame():
    assert F.tokens_per_frame(480, 832) == 1560
    assert F.tokens_per_frame(512, 512) == 1024
    with pytest.raises(ValueError, match="multiples of 16"):
        F.tokens_per_frame(480, 830)


# anchors §4.2 table: linear, self-attention (L_kv = 6 latent frames), cross-attention, total, per video frame,
# and the 2·P·tokens check with P from the config (§4.1: 1.419B and 14.288B)
TABLE_4_2 = {"1.3B": ("3.90", "2.69", "0.15", "6.74", "1.685", "4.43", "1.419"),
             "14B": ("37.30", "11.96", "0.65", "49.91", "12.48", "44.58", "14.288")}


@pytest.mark.parametrize("model", ["1.3B", "14B"])
def test_table_4_2_flops_per_latent_frame_480p(model):
    cfg = MODELS[model]
    tok = F.tokens_per_frame(480, 832)
    parts = F.dit_flops_breakdown(cfg, tok, 6 * tok)
    linear, self_attn, cross, total, per_video_frame, two_p_tok, params = TABLE_4_2[model]
    assert_printed(parts.linear / T, linear, "linear")
    assert_printed(parts.self_attention / T, self_attn, "self-attention")
    assert_printed(parts.cross_attention / T, cross, "cross-attention")
    assert_printed(F.dit_flops_per_latent_frame(cfg, tok, 6 * tok) / T, total, "total")
    assert_printed(F.flops_per_output_frame(cfg, 480, 832, steps=1, kv_frames=6, vae=None).dit / T,
                   per_video_frame, "per video frame")
    assert_printed(2 * cfg.num_parameters() * tok / T, two_p_tok, "2·P·tokens")
    assert_printed(cfg.num_parameters() / 1e9, params, "parameters")


@pytest.mark.parametrize("model, printed", [("1.3B", ("4.50", "5.39", "6.74")), ("14B", ("39.9", "43.9", "49.9"))])
def test_effect_of_kv_length(model, printed):
    tok = 1560
    for kv_frames, p in zip((1, 3, 6), printed):
        assert_printed(F.dit_flops_per_latent_frame(MODELS[model], tok, kv_frames * tok) / T, p, f"kv {kv_frames}")


@pytest.mark.parametrize("model, printed", [("1.3B", "0.954"), ("14B", "7.516")])
def test_512_per_video_frame_per_step(model, printed):
    assert_printed(F.flops_per_output_frame(MODELS[model], 512, 512, 1, 6, vae=None).dit / T, printed)


def test_stream_batch_scales_dit_by_steps_and_vae_is_per_frame():
    one = F.flops_per_output_frame(WAN_1_3B, 480, 832, 1, 6)
    four = F.flops_per_output_frame(WAN_1_3B, 480, 832, 4, 6)
    assert four.dit == pytest.approx(4 * one.dit, rel=1e-12)
    assert four.vae == one.vae > 0
    assert four.total == pytest.approx(four.dit + four.vae_encode + four.vae_decode)


def test_wan_vae_steady_state_chunk():
    enc, dec = F.wan_vae_flops_per_chunk(480, 832)
    assert_printed(enc / T, "8.05", "encode per 4-frame chunk")
    assert_printed(dec / T, "13.55", "decode per 4-frame chunk")
    ff = F.flops_per_output_frame(WAN_1_3B, 480, 832, 1, 6, vae="wan")
    assert_printed(ff.vae_encode / T, "2.01")
    assert_printed(ff.vae_decode / T, "3.39")
    assert_printed(ff.vae / T, "5.4")
    assert ff.vae > 3 * ff.dit  # "the Wan VAE costs more than 3× a 1-step 1.3B DiT"
    ff = F.flops_per_output_frame(WAN_1_3B, 512, 512, 1, 6, vae="wan")
    assert_printed(ff.vae_encode / T, "1.32")
    assert_printed(ff.vae_decode / T, "2.22")


# anchors §4.3: FPS_max = 800 / (n·F_dit + F_vae), DiT only / with the Wan VAE, steps 1..4
TABLE_4_3 = {("1.3B", "480p"): (("475", "237", "158", "119"), ("113", "91", "77", "66")),
             ("14B", "480p"): (("64", "32", "21", "16"), ("45", "26", "19", "14")),
             ("1.3B", "512"): (("838", "419", "279", "210"), ("178", "147", "125", "109")),
             ("14B", "512"): (("106", "53", "35", "27"), ("72", "43", "31", "24"))}


@pytest.mark.parametrize("model, res", list(TABLE_4_3))
def test_table_4_3_compute_ceilings(model, res):
    dit_only, with_vae = TABLE_4_3[(model, res)]
    for steps in (1, 2, 3, 4):
        ff = F.flops_per_output_frame(MODELS[model], *RES[res], steps, 6, vae="wan")
        assert_printed(PEAK / ff.dit, dit_only[steps - 1], f"{model} {res} {steps} steps DiT only")
        assert_printed(PEAK / ff.total, with_vae[steps - 1], f"{model} {res} {steps} steps DiT+VAE")


# anchors §1.3 (the paper's FPS, the input) and §4.4 (MFU %, DiT only / DiT+VAE), steps 1 and 4, by GPU count
PAPER_FPS = {("1.3B", "480p"): {1: (20.47, 13.95), 2: (39.77, 27.06), 3: (43.88, 38.09), 4: (44.38, 42.26)},
             ("14B", "480p"): {1: (12.68, 5.28), 2: (25.39, 10.69), 3: (37.55, 15.42), 4: (39.24, 20.05)},
             ("1.3B", "512"): {1: (26.21, 19.43), 4: (64.52, 61.57)},
             ("14B", "512"): {1: (18.71, 8.26), 4: (58.28, 31.62)}}
TABLE_4_4 = {("1.3B", "480p"): {1: ("4.3/18.1", "11.8/21.2"), 2: ("4.2/17.6", "11.4/20.5"),
                                3: ("3.1/13.0", "10.7/19.3"), 4: ("2.3/9.8", "8.9/16.0")},
             ("14B", "480p"): {1: ("19.8/28.3", "32.9/36.5"), 2: ("19.8/28.4", "33.3/37.0"),
                               3: ("19.5/28.0", "32.1/35.5"), 4: ("15.3/21.9", "31.3/34.7")},
             ("1.3B", "512"): {1: ("3.1/14.7", "9.3/17.9"), 4: ("1.9/9.1", "7.3/14.2")},
             ("14B", "512"): {1: ("17.6/25.9", "31.0/34.7"), 4: ("13.7/20.1", "29.7/33.2")}}


@pytest.mark.parametrize("model, res", list(TABLE_4_4))
def test_table_4_4_mfu_implied_by_paper_fps(model, res):
    for gpus, cells in TABLE_4_4[(model, res)].items():
        for steps, cell in zip((1, 4), cells):
            fps = PAPER_FPS[(model, res)][gpus][0 if steps == 1 else 1]
            ff = F.flops_per_output_frame(MODELS[model], *RES[res], steps, 6, vae="wan")
            dit_only, with_vae = cell.split("/")
            where = f"{model} {res} {steps} steps {gpus} GPUs"
            assert_printed(100 * F.mfu(ff.dit, fps, PEAK, num_gpus=gpus), dit_only, where + " DiT only")
            assert_printed(100 * F.mfu(ff, fps, PEAK, num_gpus=gpus), with_vae, where + " DiT+VAE")


def test_mfu_rejects_tflops_units():
    with pytest.raises(ValueError, match="FLOP/s"):
        F.mfu(1e12, 10.0, 800.0)


def test_peak_table_and_measured_override():
    assert F.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == (800.0, "table:H100")
    assert F.peak_bf16_tflops("NVIDIA H100 80GB HBM3", measured=815.0) == (815.0, "measured")
    assert F.peak_bf16_tflops("cpu") == (None, "unknown")


def test_vae_options():
    base = F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae="wan")
    assert F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae=None).vae == 0
    assert F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae={"name": "none"}).vae == 0
    taehv = F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae={"name": "taehv", "encoder": "wan"})
    assert taehv.vae_encode == base.vae_encode and taehv.vae_decode < base.vae_decode / 3
    tiny = F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae={"name": "wan", "dim": 16})
    assert tiny.vae < base.vae / 10
    assert set(base.as_dict()) == {"flops_per_frame_" + k for k in ("dit", "vae_encode", "vae_decode", "vae", "total")}
    with pytest.raises(ValueError, match="no FLOP model for vae 'sdxl'"):
        F.flops_per_output_frame(WAN_1_3B, 480, 832, 2, 6, vae="sdxl")


# ---- the walks count what the modules do: torch's FLOP counter on one steady-state chunk (small sizes, CPU)
def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_wan_vae_walk_equals_module():
    from sdv2_lab.vae.wan_vae import WanVAE
    h, w = 32, 48
    vae = WanVAE(dim=8).eval()
    state = vae.new_state()
    vae.encode(state, torch.randn(1, 3, 5, h, w))            # the first chunk (1 + 4 frames) is not steady state
    vae.decode(state, torch.randn(1, 2, 16, h // 8, w // 8))
    enc, dec = F.wan_vae_flops_per_chunk(h, w, dim=8)
    assert _counted(lambda: vae.encode(state, torch.randn(1, 3, 4, h, w))) == enc
    assert _counted(lambda: vae.decode(state, torch.randn(1, 1, 16, h // 8, w // 8))) == dec


def test_taehv_walk_equals_module():
    from sdv2_lab.vae.taehv import TAEHV, TAEHVVAE
    h, w = 32, 48
    vae = TAEHVVAE(TAEHV(), None).eval()                     # TAEHV's own encoder and decoder
    state = vae.new_state()
    vae.encode(state, torch.randn(1, 3, 5, h, w))
    vae.decode(state, torch.randn(1, 2, 16, h // 8, w // 8))
    enc, dec = F.taehv_flops_per_chunk(h, w)
    assert _counted(lambda: vae.encode(state, torch.randn(1, 3, 4, h, w))) == enc
    assert _counted(lambda: vae.decode(state, torch.randn(1, 1, 16, h // 8, w // 8))) == dec


def test_dit_formula_equals_model_in_steady_state():
    """The tiny DiT with a full KV cache: torch counts attention (math SDPA: bmm) = §4's self- plus cross-attention,
    and matmuls + convs = §4's linear layers plus exactly what §4 leaves out (patch embedding, head, time MLP)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from sdv2_lab.backbones.checkpoints import load_backbone
    cfg = WanDiTConfig(name="tiny", dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
    model = load_backbone(cfg, "dummy", device="cpu", dtype=torch.float32)
    h, w, kv_frames = 32, 48, 4
    cache = model.new_cache(1, h, w, kv_frames, 1, -1)
    tok = cache.spec.frame_tokens
    assert tok == F.tokens_per_frame(h, w)
    model.set_prompt(cache, torch.randn(1, 512, cfg.text_dim))  # text K/V: once per prompt, not per step
    with torch.no_grad():
        model(torch.randn(1, 2, 16, h // 8, w // 8), torch.full((1, 2), 700), cache, [0])
        for chunk in range(2, 2 + kv_frames):  # fill the window: from here on every step sees kv_frames frames
            model(torch.randn(1, 1, 16, h // 8, w // 8), torch.full((1, 1), 700), cache, [chunk * tok])
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 1, 16, h // 8, w // 8), torch.full((1, 1), 500), cache, [(2 + kv_frames) * tok])
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    parts = F.dit_flops_breakdown(cfg, tok, kv_frames * tok)
    assert counted.pop("aten.bmm") == parts.self_attention + parts.cross_attention
    assert sum(counted.values()) == parts.linear + F.dit_uncounted_flops_per_latent_frame(cfg, tok)
    assert F.dit_uncounted_flops_per_latent_frame(WAN_1_3B, 1560) < 1e-4 * F.dit_flops_per_latent_frame(WAN_1_3B, 1560, 9360)


@pytest.mark.parametrize("recipe, mode", [("self_forcing", "single_wo"), ("rolling_forcing", "single_wo"),
                                          ("memflow", "single_wo"), ("sdv2", "single"), ("sdv2", "single_wo")])
def test_the_recipes_flops_equal_what_the_engine_runs(recipe, mode):
    """``settings.frame_flops`` (what every MFU divides by) counts the recipe's forwards and attended frames:
    the context pass, the rolling window's calls and t = 0 pass, the memory bank. Torch's FLOP counter over the
    DiT calls of steady chunks (the cache full) at the tiny size equals it, plus §4's uncounted parts, exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from sdv2_lab.build import build_pipeline, compose_config
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.settings import backbone_config, frame_flops, pipeline_config
    h, w = 32, 48
    cfg = compose_config("config", ["backbone=tiny", f"backbone/recipe={recipe}", f"mode={mode}", f"height={h}",
                                    f"width={w}", "warmup=false", "steps=2" if recipe == "sdv2" else "t2v=false"])
    pipe, pc = build_pipeline(cfg), pipeline_config(cfg)
    counted, step = [], pipe.dit.step

    def counting(*a):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
            out = step(*a)
        counted.append(c.get_total_flops())
        return out
    pipe.dit.step = counting
    chunks = pc.num_kv_cache // pc.frames_per_block + len(pc.denoising_steps) + 6
    clip = synthetic_clip(pc.first_chunk_frames + pc.chunk_frames * chunks, h, w)[0]
    pipe.start("a red kite")
    pipe.push(clip[:, :pc.first_chunk_frames])
    per_chunk = []
    for k in range(chunks):
        counted.clear()
        a = pc.first_chunk_frames + k * pc.chunk_frames
        pipe.push(clip[:, a:a + pc.chunk_frames])
        per_chunk.append(sum(counted))
    tok = F.tokens_per_frame(h, w)
    bcfg = backbone_config(cfg)
    per_latent = frame_flops(cfg, vae=False).dit * 4 + \
        pc.forwards_per_latent_frame * F.dit_uncounted_flops_per_latent_frame(bcfg, tok)
    assert pc.forwards_per_latent_frame == {("self_forcing", "single_wo"): 5, ("rolling_forcing", "single_wo"): 6,
                                            ("memflow", "single_wo"): 5, ("sdv2", "single"): 2,
                                            ("sdv2", "single_wo"): 2}[recipe, mode]
    assert pc.attended_frames == pc.num_kv_cache + (3 if recipe == "memflow" else 0)
    assert per_chunk[-1] == per_chunk[-2] == pytest.approx(pc.frames_per_block * per_latent, rel=1e-12)
