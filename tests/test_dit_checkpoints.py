"""Every official DiT checkpoint format loads strictly; wrong files and bad inputs fail with clear errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dit_oracle import TINY
from sdv2_lab.backbones.attention import available_attention_backends, get_attention
from sdv2_lab.backbones.checkpoints import (CheckpointError, load_backbone, read_state_dict, to_diffusers_keys)
from sdv2_lab.backbones.kv_cache import CacheSpec
from sdv2_lab.backbones.wan_dit import CausalWanDiT, WanDiTConfig

CFG = dict(name="tiny", **TINY)


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    m = CausalWanDiT(WanDiTConfig(**CFG))
    m.init_weights()
    return m


def wan_config_json(cfg: WanDiTConfig) -> dict:  # the fields of an official Wan2.1 config.json
    return {"_class_name": "WanModel", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "in_dim": 16, "out_dim": 16, "text_len": 512, "freq_dim": 256,
            "eps": 1e-6, "model_type": "t2v", "patch_size": [1, 2, 2], "window_size": [-1, -1]}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=0, atol=0, msg=k)


def test_wan_folder_single_file(tmp_path, source_model):
    save_file(source_model.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(wan_config_json(source_model.cfg)))
    loaded = load_backbone(WanDiTConfig(**CFG), tmp_path, dtype=torch.float32)
    assert_same_weights(loaded, source_model)
    assert not loaded.weights_are_dummy


def test_wan_folder_sharded_with_index(tmp_path, source_model):
    sd = source_model.state_dict()
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(wan_config_json(source_model.cfg)))
    assert_same_weights(load_backbone(WanDiTConfig(**CFG), tmp_path, dtype=torch.float32), source_model)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        load_backbone(WanDiTConfig(**CFG), tmp_path)


@pytest.mark.parametrize("container", ["generator", "generator_ema", "state_dict", None])
@pytest.mark.parametrize("prefix", ["model.", ""])
def test_streamdiffusionv2_model_pt(tmp_path, source_model, container, prefix):
    sd = {prefix + k: v for k, v in source_model.state_dict().items()}
    obj = sd if container is None else {container: sd, "step": torch.tensor(3)}
    torch.save(obj, tmp_path / "model.pt")
    loaded = load_backbone(WanDiTConfig(**CFG), tmp_path, dtype=torch.bfloat16)  # a folder holding model.pt
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert_same_weights(loaded, source_model.to(torch.bfloat16).float().to(torch.bfloat16))
    source_model.float()


def test_generator_beats_generator_ema(tmp_path, source_model):
    sd = source_model.state_dict()
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"generator_ema": ema, "generator": sd}, tmp_path / "model.pt")
    assert_same_weights(load_backbone(WanDiTConfig(**CFG), tmp_path / "model.pt", dtype=torch.float32), source_model)


def test_diffusers_layout_converts_and_matches_diffusers_model(tmp_path):
    """A diffusers WanTransformer3DModel saved with save_pretrained loads through the converter, and on a first
    chunk (empty cache: attention within the chunk only) our DiT reproduces diffusers' output."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path)
    ours = load_backbone(WanDiTConfig(**CFG), tmp_path, dtype=torch.float32)
    x = torch.randn(1, 2, 16, 4, 6)
    ctx = torch.randn(1, 512, 4096)
    t = torch.tensor([[700, 700]])
    cache = ours.new_cache(1, 32, 48, num_kv_frames=6)
    ours.set_prompt(cache, ctx)
    with torch.no_grad():
        a = ours(x, t, cache, [0])
        b = ref(hidden_states=x.transpose(1, 2), timestep=torch.tensor([700]), encoder_hidden_states=ctx,
                return_dict=False)[0].transpose(1, 2)
    assert ((a - b).norm() / b.norm()).item() < 1e-4
    # and the converter is a bijection on names
    sd = ours.state_dict()
    assert set(to_diffusers_keys(sd)) == set(ref.state_dict())


def test_strict_errors_name_the_file_and_keys(tmp_path, source_model):
    sd = dict(source_model.state_dict())
    sd.pop("blocks.1.ffn.2.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["head.head.weight"] = torch.zeros(3, 3)
    f = tmp_path / "model.pt"
    torch.save({"generator": sd}, f)
    with pytest.raises(CheckpointError) as err:
        load_backbone(WanDiTConfig(**CFG), f)
    msg = str(err.value)
    assert str(f) in msg and "blocks.1.ffn.2.bias" in msg and "blocks.0.extra.weight" in msg
    assert "head.head.weight: file (3, 3) vs model (64, 256)" in msg


def test_wrong_size_checkpoint_is_refused(tmp_path, source_model):
    # a 1.3B folder (by its config.json) into the 14B backbone: refused before any tensor is touched
    (tmp_path / "config.json").write_text(json.dumps(wan_config_json(WanDiTConfig())))
    save_file(source_model.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    big = WanDiTConfig(name="wan_14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    with pytest.raises(CheckpointError, match="dim=1536 but backbone 'wan_14b' expects dim=5120"):
        load_backbone(big, tmp_path)
    # a smaller model's weights (shapes) into a bigger config: mis-shaped keys, named
    torch.save(source_model.state_dict(), tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_backbone(WanDiTConfig(name="tiny3", dim=384, ffn_dim=512, num_heads=3, num_layers=2), tmp_path / "small.pt")


def test_dummy_weights_are_flagged_and_sized():
    m = load_backbone(WanDiTConfig(**CFG), "dummy", dtype=torch.float32)
    assert m.weights_are_dummy
    assert sum(p.numel() for p in m.parameters()) == m.cfg.num_parameters()
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in m.parameters())


def test_meta_loading_reads_no_fp32_copy(tmp_path, source_model):
    torch.save(source_model.state_dict(), tmp_path / "model.pt")
    sd, source, _ = read_state_dict(tmp_path / "model.pt")
    assert source.endswith("model.pt") and set(sd) == set(source_model.state_dict())
    m = load_backbone(WanDiTConfig(**CFG), tmp_path / "model.pt", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ bad input
def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WanDiTConfig(name="bad", dim=250, num_heads=3)


def test_height_width_multiple_of_16(source_model):
    with pytest.raises(ValueError, match="multiples of 16.*nearest valid: 480x832"):
        source_model.new_cache(1, 478, 830, num_kv_frames=6)


def test_latent_size_must_match_cache(source_model):
    cache = source_model.new_cache(1, 32, 48, num_kv_frames=6)
    source_model.set_prompt(cache, torch.randn(1, 512, 4096))
    with pytest.raises(ValueError, match="tokens per frame"):
        source_model(torch.randn(1, 1, 16, 8, 8), torch.tensor([[700]]), cache, [0])


def test_chunk_longer_than_cache(source_model):
    cache = source_model.new_cache(1, 32, 48, num_kv_frames=2)
    source_model.set_prompt(cache, torch.randn(1, 512, 4096))
    with pytest.raises(ValueError, match="longer than the KV cache"):
        source_model(torch.randn(1, 3, 16, 4, 6), torch.full((1, 3), 700), cache, [0])


def test_rope_positions_bounded(source_model):
    cache = source_model.new_cache(1, 32, 48, num_kv_frames=6)
    source_model.set_prompt(cache, torch.randn(1, 512, 4096))
    with pytest.raises(ValueError, match="rope_max_positions"):
        source_model(torch.randn(1, 1, 16, 4, 6), torch.tensor([[700]]), cache, [1024 * 6])


def test_missing_prompt_and_bad_sink_config(source_model):
    cache = source_model.new_cache(1, 32, 48, num_kv_frames=6)
    with pytest.raises(RuntimeError, match="set_prompt"):
        source_model(torch.randn(1, 1, 16, 4, 6), torch.tensor([[700]]), cache, [0])
    with pytest.raises(ValueError, match="sink_frames"):
        CacheSpec(num_layers=1, num_heads=1, head_dim=128, frame_tokens=6, num_frames=3, sink_frames=3)


def test_unknown_attention_backend_lists_usable_ones():
    with pytest.raises(ValueError, match="usable on this machine: .*sdpa"):
        get_attention("xformers")
    assert "sdpa" in available_attention_backends()
    if "flash_attn" not in available_attention_backends():
        with pytest.raises(RuntimeError, match="not usable here"):
            get_attention("flash_attn")
