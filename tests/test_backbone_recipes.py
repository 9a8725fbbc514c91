"""Plugin backbones as data: every conf/backbone entry composes, validates and names its recipe; the recipes'
mechanics (3-latent blocks, warped steps on the shift-5 grid, a first-chunk step list, Self-Forcing's clean
context pass) run in the real engine at the tiny size, checked call by call against Self-Forcing's inference loop
stated directly here (gdhe17/Self-Forcing pipeline/causal_inference.py: per block, each step's x0 re-noised to the
next step, the last step's x0 emitted, then one pass at t = 0 over that x0 writes the block's KV cache); each
entry's file rules load a tiny file of its official container through the build; a Hydra sweep over backbones."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.configs import CONF_DIR
from sdv2_lab.settings import dit_config, dit_load_options, pipeline_config
from sdv2_lab.units import tokens_per_latent_frame

TINY_SIZES = ["backbone.dim=256", "backbone.ffn_dim=512", "backbone.num_heads=2", "backbone.num_layers=2"]
PLUGINS = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
H, W = 32, 48


def warped(t: float, shift: float = 5.0) -> float:
    """Self-Forcing's warp: step t read on the shifted flow-matching grid, sigma' = s*sigma / (1 + (s-1)*sigma)."""
    s = t / 1000
    return 1000 * shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("name", PLUGINS)
def test_every_backbone_entry_composes_and_validates(name):
    cfg = compose_config("config", [f"backbone={name}"])
    p = pipeline_config(cfg).validate()
    assert cfg.backbone.name == name and cfg.backbone.checkpoint.path
    assert cfg.weights.kind == "dummy"
    assert 1 <= len(p.step_list) <= (5 if p.rolling_window else 4) and p.chunk_frames == 4 * p.frames_per_block
    real = compose_config("config", [f"backbone={name}", "weights=real"])
    assert real.weights.checkpoint == (os.environ.get("SDV2_CHECKPOINT") or real.backbone.checkpoint.path)


def test_the_recipes_say_what_their_papers_run():
    sf = pipeline_config(compose_config("config", ["backbone=self_forcing"]))
    from sdv2_lab.stream.schedule import FlowMatchSchedule   # the warped steps are grid points: sigma = t / 1000
    grid = FlowMatchSchedule(5.0)
    assert grid.sigma(torch.tensor(sf.step_list)).tolist() == pytest.approx([t / 1000 for t in sf.step_list], abs=1e-6)
    assert sf.step_list == pytest.approx([warped(t) for t in (1000, 750, 500, 250)], abs=1e-3)
    assert (sf.frames_per_block, sf.first_latent_frames, sf.first_chunk_frames, sf.chunk_frames) == (3, 3, 9, 12)
    assert sf.context_pass and sf.timestep_shift == 5.0 and (sf.num_kv_cache, sf.sink_frames) == (21, 0)
    pp = pipeline_config(compose_config("config", ["backbone=causal_forcing_pp_1step"]))
    assert pp.step_list == [1000.0] and len(pp.first_step_list) == 4 and pp.frames_per_block == 1
    krea = compose_config("config", ["backbone=krea_14b"])
    assert krea.backbone.dim == 5120 and krea.backbone.checkpoint.size_from_checkpoint
    assert pipeline_config(krea).step_list == [1000, 937, 833, 625]   # already on the shift-5 grid
    ll = compose_config("config", ["backbone=longlive"])
    assert (ll.num_kv_cache, ll.sink_frames, ll.adapt_sink_threshold) == (12, 3, -1)
    assert ll.backbone.checkpoint.lora_alpha == 256
    # StreamDiffusionV2's own entries keep its recipe; one key or the whole recipe can be swapped
    sd = pipeline_config(compose_config("config", ["backbone=wan_1_3b"]))
    assert (sd.step_list, sd.frames_per_block, sd.first_chunk_frames, sd.num_kv_cache) == ([700, 500], 1, 5, 6)
    assert compose_config("config", ["backbone=self_forcing", "steps=2"]).steps == 2
    swapped = pipeline_config(compose_config("config", ["backbone/recipe=self_forcing"]))
    assert swapped.frames_per_block == 3 and swapped.context_pass


# ---------------------------------------------------------------------------------------------- the loop
def traced_run(overrides, monkeypatch, t2v: bool, frames: int = 0, blocks: int = 0):
    """Stream the tiny model with a recipe; every DiT call as (input, timesteps, starts, output)."""
    cfg = compose_config("config", ["backbone=tiny", f"height={H}", f"width={W}", "warmup=false", *overrides,
                                    *(["t2v=true", f"num_frames={frames}"] if t2v else [])])
    pipe = build_pipeline(cfg)
    d = pipe.driver
    monkeypatch.setattr(d, "_randn", lambda s, shape: torch.zeros(shape, dtype=d.dtype))
    calls, step = [], pipe.dit.step

    def traced(x, t, cache, plan):
        out = step(x, t, cache, plan)
        calls.append((x.clone(), t.clone(), list(plan.starts), out.clone()))
        return out

    monkeypatch.setattr(pipe.dit, "step", traced)
    pipe.start("a recipe")
    if t2v:
        out = pipe.generate(frames)
    else:
        from sdv2_lab.io.synthetic import synthetic_clip
        out = pipe.push(synthetic_clip(frames, H, W, velocity=(0.7, 2.3))[0])
        tail = pipe.flush()
        out = torch.cat([o for o in (out, tail) if o is not None and len(o)]) if out is not None else tail
    return pipe, calls, out


def check_self_forcing_loop(pipe, calls, first_steps, steps, first_latents, block_latents, v2v=False):
    """Self-Forcing's per-block loop, stated directly: with zero noise draws, the input of step k+1 is
    (1 - sigma_{k+1}) * x0_k where x0_k = x_k - sigma_k * v_k (flow matching), the block's output is the last
    x0, and one more call at t = 0 over that x0 at the same position writes the cache; blocks follow in order.
    V2V (StreamDiffusionV2's way in): a later chunk's first pass runs at the motion-aware noise controller's
    timestep, not the list's first."""
    S = tokens_per_latent_frame(H, W)
    sigma = pipe.driver.schedule.sigma
    i, start, blocks = 0, 0, 0
    while i < len(calls):
        ts = first_steps if blocks == 0 else steps
        f = first_latents if blocks == 0 else block_latents
        group = calls[i:i + len(ts) + 1]
        assert len(group) == len(ts) + 1, f"block {blocks}: {len(group)} calls"
        x0 = None
        for k, (x, t, starts, v) in enumerate(group):
            assert starts == [start], f"block {blocks} pass {k}: position {starts}, expected {start}"
            assert x.shape[1] == f
            if v2v and blocks > 0 and k == 0:
                assert 0 < float(t.max()) < 1000 and torch.all(t == t.flatten()[0])
            else:
                want_t = ts[k] if k < len(ts) else 0.0
                assert torch.allclose(t.double(), torch.full_like(t.double(), want_t), atol=1e-3), (blocks, k, t)
            if k > 0:
                want = x0 if k == len(ts) else (1 - ts[k] / 1000) * x0
                torch.testing.assert_close(x, want.to(x.dtype), rtol=1e-5, atol=1e-5,
                                           msg=f"block {blocks} pass {k}: not the loop's input")
            if k < len(ts):
                x0 = x.double() - sigma(t).double().reshape(*t.shape, 1, 1, 1) * v.double()
        i += len(group)
        start += f * S
        blocks += 1
    return blocks


SF = ["backbone/recipe=self_forcing", "mode=single_wo", "num_kv_cache=12"]


def test_self_forcing_t2v_runs_its_loop(monkeypatch):
    steps = [warped(t) for t in (1000, 750, 500, 250)]
    pipe, calls, out = traced_run(SF, monkeypatch, t2v=True, frames=33)
    blocks = check_self_forcing_loop(pipe, calls, steps, steps, 3, 3)
    assert blocks == 3 and out.shape[0] == 33      # 9 latent frames in blocks of 3 -> 1 + 4 * 8 frames


def test_self_forcing_v2v_runs_its_loop_on_12_frame_chunks(monkeypatch):
    steps = [warped(t) for t in (1000, 750, 500, 250)]
    pipe, calls, out = traced_run(SF, monkeypatch, t2v=False, frames=9 + 12 * 2)
    assert check_self_forcing_loop(pipe, calls, steps, steps, 3, 3, v2v=True) == 3
    assert out.shape[0] == 33


def test_a_first_chunk_step_list_runs_on_the_first_chunk_only(monkeypatch):
    """Causal Forcing++ 1-step: the first frame with the 4-step list, every later frame one step at t = 1000."""
    first = [warped(t) for t in (1000, 750, 500, 250)]
    pipe, calls, out = traced_run(["backbone/recipe=causal_forcing_pp_1step", "mode=single_wo", "num_kv_cache=8"],
                                  monkeypatch, t2v=False, frames=1 + 4 * 5)
    assert check_self_forcing_loop(pipe, calls, first, [1000.0], 1, 1, v2v=True) == 6
    assert out.shape[0] == 21


def test_warped_steps_reach_the_dit_in_stream_batch_mode_too(monkeypatch):
    """mode=single with a Self-Forcing recipe: the stream batch's rows carry the warped steps, and slot 0's
    motion-controlled step (1000 s - 100) is warped onto the same grid."""
    steps = [warped(t) for t in (1000, 750)]
    _, calls, out = traced_run(["backbone/recipe=self_forcing", "steps=2", "num_kv_cache=12"], monkeypatch,
                               t2v=False, frames=9 + 12 * 3)
    seen = {round(float(v), 3) for _, t, _, _ in calls for v in t.flatten()}
    assert {round(s, 3) for s in steps} <= seen
    controlled = seen - {round(s, 3) for s in steps} - {0.0}
    assert controlled, "no motion-controlled step seen"
    for t in controlled:   # warp(700) = 921.05; an unwarped 1000 s - 100 would sit near 600-700
        assert any(abs(t - warped(k)) < 0.05 for k in range(550, 701)), t
    assert out.shape[0] == 45


# ---------------------------------------------------------------------------------------------- the files
def _tiny_sd():
    from sdv2_lab.backbones.checkpoints import load_backbone
    cfg = dit_config(compose_config("config", ["backbone=tiny"]))
    return {k: v.clone() for k, v in load_backbone(cfg, "dummy", dtype=torch.float32, seed=5).state_dict().items()}


@pytest.mark.parametrize("name", ["self_forcing", "causvid", "causal_forcing", "longlive", "memflow", "krea_14b",
                                  "reward_forcing", "rolling_forcing"])
def test_each_plugin_entry_loads_a_tiny_file_of_its_container(tmp_path, name):
    """weights=real with the entry's own rules (container keys, LoRA, sizes from the file): the DiT built equals
    the plain weights (plus the LoRA's product, for LongLive and MemFlow)."""
    from safetensors.torch import save_file

    from sdv2_lab.backbones.checkpoints import load_backbone
    sd = _tiny_sd()
    wrapped = {f"model.{k}": v for k, v in sd.items()}
    path, extra = tmp_path / "model.pt", []
    if name == "causvid":
        torch.save({"model": wrapped}, path)
    elif name == "reward_forcing":   # its 'generator' first, over a decoy EMA copy
        torch.save({"generator": wrapped, "generator_ema": {k: v + 1 for k, v in wrapped.items()}}, path)
    elif name == "krea_14b":
        path = tmp_path / "krea.safetensors"
        save_file({k: v.contiguous() for k, v in wrapped.items()}, str(path))
    else:
        # EMA weights under an FSDP wrapper's names, preferred by these entries over the decoy 'generator'
        torch.save({"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()},
                    "generator": {k: v + 1 for k, v in wrapped.items()}}, path)
    if name in ("longlive", "memflow"):
        r, name_q = 4, "blocks.0.self_attn.q"
        a, b = torch.randn(r, 256) * 0.05, torch.randn(256, r) * 0.05
        torch.save({f"base_model.model.{name_q}.lora_A.weight": a, f"base_model.model.{name_q}.lora_B.weight": b},
                   tmp_path / "lora.pt")
        extra = [f"backbone.checkpoint.lora={tmp_path / 'lora.pt'}"]
    sizes = [] if name == "krea_14b" else TINY_SIZES   # Krea's sizes come from the file
    cfg = compose_config("config", [f"backbone={name}", *sizes, "weights=real", f"weights.checkpoint={path}",
                                    *extra])
    dit = load_backbone(dit_config(cfg), str(path), dtype=torch.float32, **dit_load_options(cfg))
    got = dit.state_dict()
    ref = load_backbone(dit_config(compose_config("config", ["backbone=tiny"])), "dummy", dtype=torch.float32, seed=5)
    for k, v in ref.state_dict().items():
        if name in ("longlive", "memflow") and k == f"{name_q}.weight":   # W + alpha / r * B @ A, alpha 256
            want = v.double() + 256 / r * (b.double() @ a.double())
            torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-5, msg=k)
        else:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    if name == "krea_14b":
        assert (dit.cfg.dim, dit.cfg.num_layers, dit.cfg.num_heads) == (256, 2, 2)


def test_a_missing_lora_file_is_named_before_anything_loads(tmp_path):
    from sdv2_lab.preflight import check_config
    cfg = compose_config("config", ["backbone=longlive", *TINY_SIZES, "weights=real",
                                    f"backbone.checkpoint.lora={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*backbone\.checkpoint\.lora"):
        check_config(cfg)


# ---------------------------------------------------------------------------------------------- the sweep
def test_a_sweep_over_backbones_gives_one_table(tmp_path):
    """`sdv2 eval -m backbone=...` at tiny sizes: one results row per backbone, each run with its own recipe."""
    from sdv2_lab.eval.results import gather_results
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "-m", "sdv2_lab.cli", "eval", "-m",
                        "backbone=wan_1_3b,self_forcing,causal_forcing_pp_1step", *TINY_SIZES, "mode=single_wo",
                        "num_kv_cache=12", "logger=none", "metrics=none", "dataset.n=1", "dataset.frames=33",
                        "eval.warmup=false", "eval.save_videos=0", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    df = gather_results(sweep)
    assert sorted(df["backbone"]) == ["causal_forcing_pp_1step", "self_forcing", "wan_1_3b"]
    assert (df["status"] == "ok").all() and (df["e2e_fps"] > 0).all()
    steps = dict(zip(df["backbone"], df["steps"]))
    assert steps == {"wan_1_3b": 2, "self_forcing": 4, "causal_forcing_pp_1step": 1}
    assert Path(sweep).is_dir()


# ---------------------------------------------------------------------------------------------- the seed's doors
def test_the_seeds_api_and_run_v2v_take_a_model(tmp_path):
    """``model=`` (API) / ``--model`` (run_v2v.sh) pick a backbone entry with its recipe; ``step`` left out is the
    recipe's; with a checkpoint folder the entry's file rules read the official weights of that folder."""
    from sdv2_lab.seed_config import seed_overrides
    from sdv2_lab.tiny_checkpoint import write_tiny_checkpoint
    from sdv2_lab.v2v import parse, to_overrides

    cfg = compose_config("config", seed_overrides(model="self_forcing", device="cpu", height=H, width=W))
    assert cfg.backbone.name == "self_forcing" and cfg.steps == 4 and cfg.frames_per_block == 3
    assert compose_config("config", seed_overrides(device="cpu")).steps == 2          # StreamDiffusionV2's recipe
    assert compose_config("config", seed_overrides(model="longlive", step=1, device="cpu")).steps == 1
    with pytest.raises(ValueError, match=r"model must be one of .*self_forcing.*'nope'"):
        seed_overrides(model="nope")
    folder = write_tiny_checkpoint(tmp_path)
    cfg = compose_config("config", seed_overrides(checkpoint_folder=folder, model="causal_forcing_pp_1step",
                                                  device="cpu", height=H, width=W))
    assert cfg.backbone.name == "causal_forcing_pp_1step" and cfg.weights.kind == "real"
    assert cfg.backbone.dim == 256 and cfg.steps == 1 and list(cfg.first_chunk_steps) == [1000, 750, 500, 250]
    assert Path(cfg.weights.checkpoint) == folder / "model.pt"
    a = parse(["single", "--model", "self_forcing", "--device", "cpu", "--height", str(H), "--width", str(W)])
    cfg = compose_config("config", to_overrides(a))
    assert cfg.backbone.name == "self_forcing" and cfg.steps == 4


RECIPES = sorted(p.stem for p in (CONF_DIR / "backbone" / "recipe").glob("*.yaml"))


# T2V for the recipes whose mechanics differ (the rest share Self-Forcing's and stream V2V here)
T2V_RECIPES = {"sdv2", "self_forcing", "causal_forcing_pp_1step", "krea", "longlive"}


@pytest.mark.parametrize("recipe,t2v", [(r, False) for r in RECIPES] + [(r, True) for r in RECIPES if r in T2V_RECIPES],
                         ids=lambda v: v if isinstance(v, str) else ("t2v" if v else "v2v"))
def test_every_recipe_streams_in_single_mode(recipe, t2v, monkeypatch):
    """Each recipe at the tiny size, stream batch on: whole chunks of its sizes come out, none lost or doubled."""
    cfg = compose_config("config", [f"backbone/recipe={recipe}", f"height={H}", f"width={W}", "warmup=false"])
    pc = pipeline_config(cfg)
    small = pc.num_kv_cache > 12 and not pc.rolling_window   # the rolling window needs its 21-frame span
    ov = [f"backbone/recipe={recipe}", "num_kv_cache=12" if small else f"num_kv_cache={pc.num_kv_cache}"]
    frames = pc.first_chunk_frames + pc.chunk_frames * 3
    if t2v:
        frames = 1 + 4 * pc.frames_per_block * 3     # about four blocks ("about num_frames": whole blocks are made)
    _, calls, out = traced_run(ov, monkeypatch, t2v=t2v, frames=frames)
    assert calls and out.shape[1:] == (H, W, 3) and torch.isfinite(out).all()
    if not t2v:
        assert out.shape[0] == frames
    else:
        assert abs(out.shape[0] - frames) <= pc.chunk_frames
