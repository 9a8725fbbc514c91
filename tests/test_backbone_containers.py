"""The causal-Wan plugins' official DiT containers load to the same model as the plain layout; container
preference, size-from-shapes and the PEFT LoRA merge (LongLive) are exact and strict, with errors naming the file
and the key. Tiny files only: each test writes its own from one random tiny model."""
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from dit_oracle import TINY
from sdv2_lab.backbones.checkpoints import CheckpointError, load_backbone, size_from_checkpoint, stage_parts
from sdv2_lab.backbones.wan_dit import CausalWanDiT, WanDiTConfig

CFG = dict(name="tiny", **TINY)
LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = CausalWanDiT(WanDiTConfig(**CFG))
    m.init_weights()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two different tiny models ("generator" and "generator_ema"), each also loaded from a plain flat file."""
    d = tmp_path_factory.mktemp("plain")
    out = {}
    for name, seed in (("gen", 1), ("ema", 2)):
        sd = random_state_dict(seed)
        torch.save(sd, d / f"{name}.pt")
        model = load_backbone(WanDiTConfig(**CFG), d / f"{name}.pt", dtype=torch.float32)
        out[name] = (sd, model, forward(model))
    return out


def forward(model):
    """One first-chunk forward on fixed inputs (as test_dit_checkpoints runs the model)."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 2, 16, 4, 6, generator=g), torch.randn(1, 512, 4096, generator=g)
    cache = model.new_cache(1, 32, 48, num_kv_frames=6)
    model.set_prompt(cache, ctx)
    with torch.no_grad():
        return model(x, torch.tensor([[700, 700]]), cache, [0])


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def model_prefix(sd):                  # the training wrapper's attribute: model.blocks.0...
    return {f"model.{k}": v for k, v in sd.items()}


def fsdp_outer(sd):                    # Causal Forcing EMA: model._fsdp_wrapped_module.blocks.0...
    return {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}


def fsdp_inside(sd):                   # FSDP wrapping the model and each block, as Rolling Forcing's EMA names
    return {"model._fsdp_wrapped_module." + re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module.", k): v
            for k, v in sd.items()}


def compiled(sd):                      # a torch.compile'd module's state dict
    return {f"model._orig_mod.{k}": v for k, v in sd.items()}


# (file, build(gen sd, ema sd) -> what is saved, container_keys, which weights must load)
CONTAINERS = {
    "self_forcing": ("self_forcing_dmd.pt", lambda g, e: {"generator": model_prefix(g),
                                                           "generator_ema": model_prefix(e)}, None, "gen"),
    "self_forcing_use_ema": ("self_forcing_dmd.pt", lambda g, e: {"generator": model_prefix(g),
                                                                   "generator_ema": model_prefix(e)},
                             ["generator_ema", "generator"], "ema"),
    "rolling_forcing_ema": ("rolling_forcing_dmd.pt", lambda g, e: {"generator": model_prefix(g),
                                                                     "generator_ema": fsdp_inside(e)},
                            ["generator_ema", "generator"], "ema"),
    "causal_forcing_ema": ("causal_forcing.pt", lambda g, e: {"generator_ema": fsdp_outer(e), "step": 7}, None, "ema"),
    "causvid": ("autoregressive_checkpoint", lambda g, e: {"model": model_prefix(g)}, None, "gen"),
    "krea_realtime": ("krea-realtime-video-14b.safetensors", lambda g, e: model_prefix(g), None, "gen"),
    "longlive_base": ("longlive_base.pt", lambda g, e: {"generator": model_prefix(g)}, None, "gen"),
    "longlive_base_model_key": ("longlive_base.pt", lambda g, e: {"model": model_prefix(g)}, None, "gen"),
    "torch_compile": ("compiled.pt", lambda g, e: {"generator": compiled(g)}, None, "gen"),
}


@pytest.mark.parametrize("case", list(CONTAINERS))
def test_container_loads_like_the_plain_layout(tmp_path, weights, case):
    name, build, container_keys, expect = CONTAINERS[case]
    obj = build(weights["gen"][0], weights["ema"][0])
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(obj, path)
    elif name.endswith(".pt"):
        torch.save(obj, path)
    else:                              # CausVid: a folder holding model.pt
        path.mkdir()
        torch.save(obj, path / "model.pt")
    loaded = load_backbone(WanDiTConfig(**CFG), path, dtype=torch.float32, container_keys=container_keys)
    _, reference, out = weights[expect]
    assert_same_weights(loaded, reference)
    assert torch.equal(forward(loaded), out)


def test_unknown_container_keys_are_refused(tmp_path, weights):
    f = tmp_path / "odd.pt"
    torch.save({"weights": weights["gen"][0], "step": 3}, f)
    with pytest.raises(CheckpointError) as err:
        load_backbone(WanDiTConfig(**CFG), f)
    msg = str(err.value)
    assert str(f) in msg and "'weights'" in msg and "'step'" in msg
    assert "['generator', 'generator_ema', 'state_dict', 'model']" in msg
    # a plugin asking for EMA weights only, from a file holding only "generator": refused, not silently swapped
    torch.save({"generator": weights["gen"][0]}, f)
    with pytest.raises(CheckpointError, match=r"\['generator_ema'\].*found: \['generator'\]"):
        load_backbone(WanDiTConfig(**CFG), f, container_keys=["generator_ema"])


def test_wrapper_names_that_collide_are_refused(tmp_path, weights):
    sd = dict(weights["gen"][0])
    sd["_fsdp_wrapped_module.head.head.bias"] = sd["head.head.bias"]
    torch.save(sd, tmp_path / "twice.pt")
    with pytest.raises(CheckpointError, match=r"twice\.pt.*'head\.head\.bias' and '_fsdp_wrapped_module\.head"):
        load_backbone(WanDiTConfig(**CFG), tmp_path / "twice.pt")


# ------------------------------------------------------------------------------------------ size from shapes
def test_size_from_checkpoint(tmp_path, weights):
    sd = weights["gen"][0]
    save_file(model_prefix(sd), tmp_path / "flat.safetensors")
    torch.save({"generator_ema": fsdp_inside(sd)}, tmp_path / "ema.pt")
    assert size_from_checkpoint(tmp_path / "flat.safetensors") == TINY
    assert size_from_checkpoint(tmp_path / "ema.pt") == TINY
    # Krea's rule on a 14B-shaped header (one column per tensor: only the shapes' first dims matter)
    big = {"model.blocks.0.self_attn.k.weight": torch.zeros(5120, 1), "model.blocks.0.ffn.0.weight": torch.zeros(13824, 1),
           **{f"model.blocks.{i}.modulation": torch.zeros(1) for i in range(40)}}
    save_file(big, tmp_path / "krea-realtime-video-14b.safetensors")
    assert size_from_checkpoint(tmp_path / "krea-realtime-video-14b.safetensors") == dict(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    big.pop("model.blocks.0.ffn.0.weight")
    save_file(big, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: no 'blocks\.0\.ffn\.0\.weight'"):
        size_from_checkpoint(tmp_path / "cut.safetensors")


# ------------------------------------------------------------------------------------------------------ LoRA
def lora_state_dict(sd, r=4, prefix="base_model.model.", adapter="", skip=()):
    """A PEFT-style LoRA on every block Linear (LongLive's targets) but ``skip``: {name: (A, B)} and the file dict."""
    g = torch.Generator().manual_seed(5)
    pairs, out = {}, {}
    for i in range(TINY["num_layers"]):
        for lin in LINEARS:
            name = f"blocks.{i}.{lin}"
            if name in skip:
                continue
            out_f, in_f = sd[f"{name}.weight"].shape
            a, b = torch.randn(r, in_f, generator=g) * 0.05, torch.randn(out_f, r, generator=g) * 0.05
            pairs[name] = (a, b)
            out[f"{prefix}{name}.lora_A{adapter}.weight"] = a
            out[f"{prefix}{name}.lora_B{adapter}.weight"] = b
    return pairs, out


def write_lora(path, file_sd, container=None):
    if path.suffix == ".safetensors":
        save_file(file_sd, path)
    else:
        torch.save(file_sd if container is None else {container: file_sd, "critic_lora": {}, "step": 3}, path)
    return path


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, weights):
    f = tmp_path_factory.mktemp("longlive") / "longlive_base.pt"
    torch.save({"generator": model_prefix(weights["gen"][0])}, f)
    return f


# (LoRA file name, key prefix, adapter name, container): LongLive's lora.pt first, then the other accepted spellings
LORA_LAYOUTS = [("lora.pt", "base_model.model.", "", "generator_lora"),
                ("lora.pt", "base_model.model.model.", ".default", None),
                ("lora.safetensors", "model.", ".default", None),
                ("lora.safetensors", "", "", None)]


@pytest.mark.parametrize("alpha", [8, None])
@pytest.mark.parametrize("layout", LORA_LAYOUTS, ids=lambda t: f"{t[0]}:{t[1] or '-'}{t[2] or ''}:{t[3]}")
def test_lora_merges_exactly(tmp_path, weights, base_file, layout, alpha, caplog):
    """Every merged weight is W + alpha/r * B @ A (float64 reference; fp32 rtol 1e-5, atol 1e-6 for entries near
    zero); every other tensor is bit-identical to the base."""
    name, prefix, adapter, container = layout
    base_sd, base_model, _ = weights["gen"]
    pairs, file_sd = lora_state_dict(base_sd, prefix=prefix, adapter=adapter, skip={"blocks.1.ffn.2"})
    lora = write_lora(tmp_path / name, file_sd, container)
    with caplog.at_level(logging.INFO, logger="sdv2_lab.backbones.lora"):
        merged = load_backbone(WanDiTConfig(**CFG), base_file, dtype=torch.float32, lora=lora, lora_alpha=alpha)
    assert f"merged a LoRA into 19 Linear weights (rank 4, alpha {'= rank' if alpha is None else alpha})" in caplog.text
    scale = (4 if alpha is None else alpha) / 4
    got, base = merged.state_dict(), base_model.state_dict()
    for k in got:
        module = k.removesuffix(".weight")
        if module in pairs:
            a, b = pairs[module]
            want = base[k].double() + scale * (b.double() @ a.double())
            torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], base[k]), k
    assert not torch.equal(got["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])


def test_lora_merge_happens_before_qkv_fusion(tmp_path, weights, base_file):
    """The merged model runs its fused q/k/v GEMM on the merged weights: its output equals that of a plain file
    holding the merged weights."""
    _, file_sd = lora_state_dict(weights["gen"][0])
    merged = load_backbone(WanDiTConfig(**CFG), base_file, dtype=torch.float32,
                           lora=write_lora(tmp_path / "lora.pt", file_sd, "generator_lora"))
    attn = merged.blocks[0].self_attn
    assert attn._fused[0].data_ptr() == attn.q.weight.data_ptr()      # the fused path is the one that runs
    torch.save({k: v.clone() for k, v in merged.state_dict().items()}, tmp_path / "merged.pt")
    plain = load_backbone(WanDiTConfig(**CFG), tmp_path / "merged.pt", dtype=torch.float32)
    assert torch.equal(forward(merged), forward(plain))


def test_lora_on_a_pipe_stage(tmp_path, weights, base_file):
    """A stage merges only the blocks it holds, exactly as the whole model does."""
    lora = write_lora(tmp_path / "lora.pt", lora_state_dict(weights["gen"][0])[1], "generator_lora")
    full = load_backbone(WanDiTConfig(**CFG), base_file, dtype=torch.float32, lora=lora)
    stage = load_backbone(WanDiTConfig(**CFG), base_file, dtype=torch.float32, lora=lora,
                          parts=stage_parts(2, 1, 2, embed=False, head=True))
    assert stage.blocks[0].ffn[0].weight.is_meta
    for k, v in stage.blocks[1].state_dict().items():
        assert torch.equal(v, full.blocks[1].state_dict()[k]), k


def _bad_shape_a(sd):
    sd["base_model.model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(4, 255)
    return "base_model.model.blocks.0.self_attn.q.lora_A.weight", r"\(4, 255\).*lora_A must be \[r, 256\]"


def _bad_shape_b(sd):
    sd["base_model.model.blocks.1.ffn.0.lora_B.weight"] = torch.zeros(512, 3)
    return "base_model.model.blocks.1.ffn.0.lora_B.weight", r"expected \[512, 4\]"


def _no_module(sd):
    sd["base_model.model.blocks.0.self_attn.z.lora_A.weight"] = torch.zeros(4, 256)
    sd["base_model.model.blocks.0.self_attn.z.lora_B.weight"] = torch.zeros(256, 4)
    return "base_model.model.blocks.0.self_attn.z.lora_", "'blocks.0.self_attn.z', which is no module"


def _no_block(sd):
    sd["base_model.model.blocks.7.ffn.0.lora_A.weight"] = torch.zeros(4, 256)
    sd["base_model.model.blocks.7.ffn.0.lora_B.weight"] = torch.zeros(512, 4)
    return "base_model.model.blocks.7.ffn.0.lora_", "which is no module"


def _not_linear(sd):
    sd["base_model.model.blocks.0.norm3.lora_A.weight"] = torch.zeros(4, 256)
    sd["base_model.model.blocks.0.norm3.lora_B.weight"] = torch.zeros(256, 4)
    return "base_model.model.blocks.0.norm3.lora_", "a LayerNorm, not a Linear"


def _no_partner(sd):
    sd.pop("base_model.model.blocks.1.cross_attn.v.lora_B.weight")
    return "base_model.model.blocks.1.cross_attn.v.lora_A.weight", "no lora_B partner"


def _not_lora(sd):
    sd["base_model.model.blocks.0.self_attn.q.bias"] = torch.zeros(256)
    return "base_model.model.blocks.0.self_attn.q.bias", "is not a LoRA weight"


@pytest.mark.parametrize("break_it", [_bad_shape_a, _bad_shape_b, _no_module, _no_block, _not_linear, _no_partner,
                                      _not_lora], ids=lambda f: f.__name__.strip("_"))
def test_bad_lora_names_the_file_and_key(tmp_path, weights, base_file, break_it):
    _, file_sd = lora_state_dict(weights["gen"][0])
    key, why = break_it(file_sd)
    lora = write_lora(tmp_path / "lora.pt", file_sd, "generator_lora")
    with pytest.raises(CheckpointError) as err:
        load_backbone(WanDiTConfig(**CFG), base_file, dtype=torch.float32, lora=lora)
    msg = str(err.value)
    assert str(lora) in msg and key in msg, msg
    assert re.search(why, msg), msg


def test_dummy_weights_refuse_a_lora(tmp_path):
    with pytest.raises(CheckpointError, match="dummy .*cannot take a LoRA file .*lora.pt"):
        load_backbone(WanDiTConfig(**CFG), "dummy", lora=tmp_path / "lora.pt")
