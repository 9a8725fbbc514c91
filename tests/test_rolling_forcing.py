"""Rolling Forcing's rolling window (sdv2_lab/stream/rolling.py) in the real engine at the tiny size, against its
inference loop stated directly here from TencentARC/RollingForcing (pipeline/rolling_forcing_inference.py,
wan/modules/causal_model.py):

* blocks of 3 latent frames; a window of the n = 5 blocks in flight, oldest first, block i at level t[n-1-i] of
  the warped list [1000, 800, 600, 400, 200]; one DiT call per window, full attention inside it;
* its keys: the anchor (block 0's clean keys, moved to the frames just before the working frames), the working
  frames (the latest 21 - window - 3 clean frames before the window, block 0 excluded), the window; none before the
  first block has left;
* after the call each block's x0 re-noised to its next level; the block at the last level leaves, emitted, and a
  pass at t = 0 over it alone writes it as clean frames, attending to the latest 21 clean frames, itself included;
* warm-up windows hold only the real blocks; the flush's n - 1 windows no new one.
"""
import re
from types import SimpleNamespace

import pytest
import torch

from sdv2_lab.backbones.kv_cache import StreamKVCache
from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.stream.schedule import FlowMatchSchedule
from sdv2_lab.units import tokens_per_latent_frame

H, W = 32, 48
S = tokens_per_latent_frame(H, W)
BASE = ["backbone=tiny", "backbone/recipe=rolling_forcing", f"height={H}", f"width={W}", "warmup=false"]
STEPS = [1000, 800, 600, 400, 200]
BLOCK, SPAN, ANCHOR = 3, 21, 3          # latent frames per block, attention span (max_attention_size), anchor


def build(extra=(), t2v=True):
    return build_pipeline(compose_config("config", BASE + (["t2v=true"] if t2v else []) + list(extra)))


def emitted_stream(pipe, blocks: int, seed: int = 0, prompt: str = "a red kite over the sea"):
    """T2V of ``blocks`` blocks through the driver (generate: every chunk, then the flush); the x0 of each emitted
    block as the engine emitted it, and the number of DiT calls."""
    d, emitted, calls = pipe.driver, [], []
    denoise, step = d.denoise, pipe.dit.step

    def kept(job, encoded):
        out = denoise(job, encoded)
        emitted.extend(x.clone() for x, e in zip(out, job.emit) if e)
        return out

    def counted(*a):
        calls.append(a[0].shape[1])
        return step(*a)

    d.denoise, pipe.dit.step = kept, counted
    s = d.open(prompt, seed=seed)
    d.generate(s, 1 + 4 * (BLOCK * blocks - 1))
    return emitted, calls


class Keys:
    """A stand-in cache that hands the DiT exactly the past keys the loop chose: per layer, ``past`` then the
    call's own keys. It records each layer's new keys and values (the clean frames, after a t = 0 pass)."""

    def __init__(self, prompt_cache, past):
        self.prompt_cache, self.past, self.new, self.spec = prompt_cache, past, {}, prompt_cache.spec

    def update(self, layer, plan, k, v):
        self.new[layer] = (k, v)
        pk, pv = self.past[layer]
        return torch.cat([pk, k], 1), torch.cat([pv, v], 1), None, None

    def cross(self, layer, plan):
        return self.prompt_cache.cross(layer, plan)


def rolling_forcing_loop(pipe, blocks: int, seed: int = 0, prompt: str = "a red kite over the sea"):
    """Rolling Forcing's T2V loop stated directly, on the pipeline's DiT, with the driver's noise draws in its order
    (per window: the new block's noise (in the flush too, unused), then one re-noise draw over the window's blocks,
    newest first). Returns each emitted block's x0, in order."""
    dit, dev = pipe.dit, pipe.driver.device
    L, n, h, w = dit.cfg.num_layers, len(STEPS), H // 8, W // 8
    sched = FlowMatchSchedule(5.0)
    levels = [sched.timesteps[1000 - t] for t in STEPS]        # warp_denoising_step: t -> timesteps[1000 - t]
    g = torch.Generator(device=dev).manual_seed(seed)
    prompt_cache = StreamKVCache(pipe.driver.executor.cache.spec, 1, torch.float32, dev)
    dit.set_prompt(prompt_cache, pipe.text_encoder.encode(prompt).float(), [0])
    clean = [(torch.zeros(1, 0, dit.cfg.num_heads, dit.cfg.head_dim),) * 2 for _ in range(L)]   # per layer, by frame

    def frames(layer, first, end):
        k, v = clean[layer]
        return k[:, first * S:end * S], v[:, first * S:end * S]

    def call(x, t, start, past):
        keys = Keys(prompt_cache, past)
        plan = SimpleNamespace(start_frames=torch.tensor([start]), row_range=(0, 1), row_index=torch.tensor([0]))
        return type(dit).step(dit, x, t, keys, plan), keys.new

    inflight, out = {}, []                                     # block -> [latent [F, C, h, w], level index]
    for window in range(blocks + n - 1):
        z = torch.randn(1, BLOCK, 16, h, w, generator=g, device=dev)
        if window < blocks:
            inflight[window] = [z[0], 0]
        order = sorted(inflight)                               # oldest first
        x = torch.cat([inflight[b][0] for b in order])[None]
        t = torch.cat([levels[inflight[b][1]].repeat(BLOCK) for b in order])[None]
        p = order[0] * BLOCK                                   # the window's first frame
        if p == 0:                                             # nothing has left yet: the window alone
            past = [frames(layer, 0, 0) for layer in range(L)]
        else:
            working = min(SPAN - x.shape[1] - ANCHOR, p - ANCHOR)
            shift = torch.full((1, ANCHOR), p - working - ANCHOR)   # the anchor sits just before the working frames
            past = []
            for layer in range(L):
                ak, av = frames(layer, 0, ANCHOR)
                wk, wv = frames(layer, p - working, p)
                past.append((torch.cat([dit.move_keys(ak, shift), wk], 1), torch.cat([av, wv], 1)))
        v, _ = call(x, t, p, past)
        x0 = sched.velocity_to_x0(v, x, t)[0].unflatten(0, (len(order), BLOCK))
        noise = torch.randn(len(order), BLOCK, 16, h, w, generator=g, device=dev).flip(0)   # drawn newest first
        for i, b in enumerate(order):
            if inflight[b][1] < n - 1:
                inflight[b] = [sched.add_noise(x0[i], noise[i], levels[inflight[b][1] + 1].expand(BLOCK)),
                               inflight[b][1] + 1]
        if window - order[0] == n - 1:                         # entered n - 1 windows ago: at the last level
            out.append(x0[0][None])
            del inflight[order[0]]
            end = p + BLOCK
            past = [frames(layer, max(0, end - SPAN), p) for layer in range(L)]
            _, new = call(x0[0][None], torch.zeros(1, BLOCK), p, past)
            clean = [(torch.cat([clean[l][0], new[l][0]], 1), torch.cat([clean[l][1], new[l][1]], 1)) for l in range(L)]
    return out



@pytest.mark.parametrize("blocks", [3, 9])   # a stream shorter than the window; one past the 21-frame span
def test_the_engine_runs_rolling_forcings_loop(blocks):
    """(a) Every emitted block's x0 equals the loop's (float32 on CPU, 1e-5): the window's levels, its keys (anchor,
    working frames, window), the re-noise, the leaving block's t = 0 pass, the warm-up and the flush."""
    pipe = build()
    got, _ = emitted_stream(pipe, blocks)
    want = rolling_forcing_loop(pipe, blocks)
    assert len(got) == len(want) == blocks
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"block {k}")


def test_the_anchor_and_the_working_frames_matter():
    """The check can fail: the same loop without the anchor's move (left at frame 0) gives other outputs from the
    block whose window first has working frames and an anchor out of place (block 7: window start 9)."""
    pipe = build()
    got, _ = emitted_stream(pipe, 9)
    move = pipe.dit.move_keys
    pipe.dit.move_keys = lambda k, frames: k        # the oracle's anchor stays where it was written
    want = rolling_forcing_loop(pipe, 9)
    pipe.dit.move_keys = move
    same = [torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want)]
    assert same[:2] == [True, True] and not all(same)


def test_frames_out_equal_frames_in_with_a_fill_latency_of_n_minus_1_blocks():
    """(b) V2V pushed block by block: nothing for the first n - 1 = 4 blocks, then one block per block pushed, the
    flush gives the last 4; every input frame comes out once. One DiT call per window plus one t = 0 pass per
    block; the windows' lengths rise 3..15 in the warm-up and fall 12..3 in the flush."""
    from sdv2_lab.io.synthetic import synthetic_clip
    pipe = build(t2v=False)
    cfg, d = pipe.driver.cfg, pipe.driver
    blocks = 8
    frames = cfg.first_chunk_frames + cfg.chunk_frames * (blocks - 1)
    clip = synthetic_clip(frames, H, W, velocity=(0.7, 2.3))[0]
    calls, step = [], pipe.dit.step
    pipe.dit.step = lambda x, *a: calls.append(x.shape[1]) or step(x, *a)
    s = d.open("a red kite over the sea", seed=1)
    per_push, fed = [], 0
    for k in range(blocks):
        need = cfg.first_chunk_frames if k == 0 else cfg.chunk_frames
        per_push.append(sum(o.frames.shape[0] for o in d.push(s, clip[:, fed:fed + need])))
        fed += need
    tail = d.flush(s)
    assert per_push == [0, 0, 0, 0, cfg.first_chunk_frames, 12, 12, 12]
    assert [o.frames.shape[0] for o in tail] == [12] * 4
    assert sum(per_push) + sum(o.frames.shape[0] for o in tail) == frames == 9 + 12 * 7
    warm_up, steady, flush = [3, 6, 9, 12], [15, 3] * (blocks - 4), [12, 3, 9, 3, 6, 3, 3, 3]   # window, t = 0 pass
    assert calls == warm_up + steady + flush


@pytest.mark.parametrize("t2v", [True, False])
def test_t2v_and_v2v_stream(t2v):
    """(d) Both stream through the front door, finite, every frame out; V2V's later blocks enter at the motion
    controller's step (warped), T2V's at the list's first level."""
    from sdv2_lab.io.synthetic import synthetic_clip
    pipe = build(t2v=t2v)
    seen, step = set(), pipe.dit.step
    pipe.dit.step = lambda x, t, *a: seen.update(round(float(v), 2) for v in t.flatten()) or step(x, t, *a)
    cfg = pipe.driver.cfg
    if t2v:
        pipe.start("a red kite over the sea")
        out = torch.cat([o.frames for o in pipe.driver.generate(pipe.stream, 1 + 4 * (BLOCK * 7 - 1))])
        frames = 1 + 4 * (BLOCK * 7 - 1)
    else:
        frames = cfg.first_chunk_frames + cfg.chunk_frames * 6
        pipe.start("a red kite over the sea")
        out = torch.cat([o for o in (pipe.push(synthetic_clip(frames, H, W, velocity=(0.7, 2.3))[0]), pipe.flush())
                         if len(o)])
    assert out.shape == (frames, H, W, 3) and torch.isfinite(out).all()
    levels = {round(float(FlowMatchSchedule(5.0).timesteps[1000 - t]), 2) for t in STEPS}
    assert levels <= seen and 0.0 in seen                     # every level, and the t = 0 passes
    assert (seen - levels - {0.0} == set()) == t2v          # V2V: the controller's steps besides the list's


def test_long_streams_rebase_their_positions():
    """Positions rebased (position_refresh_frames) move every stored key back together: the same outputs as the
    stream that never rebases (1e-4: the keys' rotation in float32), and the positions stay small."""
    blocks = 14
    never, _ = emitted_stream(build(["position_refresh_frames=0"]), blocks)
    pipe = build(["position_refresh_frames=24"])
    starts, step = [], pipe.dit.step
    pipe.dit.step = lambda x, t, cache, plan: starts.append(int(plan.start_frames[0])) or step(x, t, cache, plan)
    rebased, _ = emitted_stream(pipe, blocks)
    assert max(starts) < 24 + 15 and pipe.driver.executor.cache.offset[0] > 0
    for k, (a, b) in enumerate(zip(rebased, never)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"block {k}")


def test_without_a_rebase_the_rope_table_is_a_clear_limit():
    pipe = build(["position_refresh_frames=0", "+backbone.rope_max_positions=30"])
    with pytest.raises(ValueError, match="rope_max_positions 30: set position_refresh_frames"):
        emitted_stream(pipe, 12)


@pytest.mark.parametrize("extra,match", [
    (["mode=pipe"], "mode=single or single_wo"),
    (["sink_frames=3"], "sink_frames=3"),
    (["backbone/recipe=reward_forcing", "rolling_window=true"], "sink_ema=0.999"),
    (["first_chunk_latents=1"], "the first too"),
    (["num_kv_cache=18"], "num_kv_cache=18"),
    (["position_refresh_frames=21"], "position_refresh_frames=21"),
    (["kv_cache_dtype=int8"], "kv_cache_dtype=int8"),
])
def test_a_bad_combination_is_refused_in_one_line(extra, match):
    """(e)"""
    from sdv2_lab.settings import pipeline_config
    with pytest.raises(ValueError, match=match):
        pipeline_config(compose_config("config", BASE + list(extra))).validate()


def test_five_steps_only_for_the_rolling_window():
    """The 4-step cap (the stream batch's rows: the reference's --step) stays for other recipes."""
    from sdv2_lab.settings import pipeline_config
    assert len(pipeline_config(compose_config("config", BASE)).validate().step_list) == 5
    with pytest.raises(ValueError, match="steps=5: expected an integer from 1 to 4"):
        pipeline_config(compose_config("config", BASE + ["rolling_window=false"]))
    with pytest.raises(ValueError, match="1 to 4 denoising steps"):
        from sdv2_lab.stream.config import PipelineConfig
        PipelineConfig(denoising_steps=STEPS).validate()


def test_the_official_container_gives_the_plain_layouts_outputs(tmp_path):
    """(c) A tiny file in Rolling Forcing's container ('generator_ema' under FSDP names, a decoy 'generator')
    read through the entry's rules streams the same outputs as the same weights in the plain layout."""
    from sdv2_lab.backbones.checkpoints import load_backbone
    from sdv2_lab.settings import dit_config, dit_load_options
    sizes = ["backbone.dim=256", "backbone.ffn_dim=512", "backbone.num_heads=2", "backbone.num_layers=2"]
    sd = {k: v.clone() for k, v in load_backbone(dit_config(compose_config("config", ["backbone=tiny"])), "dummy",
                                                 dtype=torch.float32, seed=5).state_dict().items()}
    official, plain = tmp_path / "rolling_forcing_dmd.pt", tmp_path / "plain.pt"
    fsdp = {"model._fsdp_wrapped_module." + re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module.", k): v
            for k, v in sd.items()}   # FSDP around the model and each block (tests/test_backbone_containers.py)
    assert "model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.ffn.0.weight" in fsdp
    torch.save({"generator_ema": fsdp,
                "generator": {f"model.{k}": v + 1 for k, v in sd.items()}}, official)
    torch.save({f"model.{k}": v for k, v in sd.items()}, plain)
    outs = []
    for path in (official, plain):
        cfg = compose_config("config", ["backbone=rolling_forcing", *sizes, "weights=real",
                                        f"weights.checkpoint={path}"])
        dit = load_backbone(dit_config(cfg), str(path), dtype=torch.float32, **dit_load_options(cfg))
        pipe = build()
        pipe.dit.load_state_dict(dit.state_dict())
        outs.append(emitted_stream(pipe, 6)[0])
    decoy = build()
    decoy.dit.load_state_dict({k: v + 1 for k, v in sd.items()})
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(outs[0][-1], emitted_stream(decoy, 6)[0][-1])


@pytest.mark.parametrize("refresh", [0, 24])
def test_graphed_windows_equal_eager(refresh):
    """The CUDA-graph executor replays the steady windows and t = 0 passes (emulated on CPU: a replay re-runs the
    captured call with the objects of its capture, into which each call's plan tensors are copied): 20 blocks,
    through the ring's fill and wrap (and rebases), equal the eager executor within 1e-5."""
    from sdv2_lab.stream.executor import CUDAGraphExecutor
    outs = {}
    for name in ("eager", "emulated"):
        pipe = build([f"position_refresh_frames={refresh}"])
        if name == "emulated":
            ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
            pipe.executor = pipe.driver.executor = ex
        outs[name], _ = emitted_stream(pipe, 20)
    assert ex.captures == 2 and ex.replays > 10           # one graph for the window, one for the t = 0 pass
    assert len(outs["emulated"]) == len(outs["eager"]) == 20
    for k, (a, b) in enumerate(zip(outs["emulated"], outs["eager"])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"block {k}")


def test_graphed_windows_of_several_streams_are_kept_per_stream():
    """Each stream's window and t = 0 pass have graphs of their own (the row is indexed on the host): with 4 streams
    all 8 are kept (more than the executor's usual 6: none recaptured as the streams take turns) and every stream
    equals its eager run."""
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.stream.clips import stream_clips
    from sdv2_lab.stream.executor import CUDAGraphExecutor
    outs = {}
    for name in ("eager", "emulated"):
        pipe = build(["streams=4"], t2v=False)
        cfg = pipe.driver.cfg
        clips = [synthetic_clip(cfg.first_chunk_frames + cfg.chunk_frames * 16, H, W, seed=i)[0] for i in range(4)]
        if name == "emulated":
            ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
            pipe.executor = pipe.driver.executor = ex
        outs[name] = stream_clips(pipe, clips, ["a", "b", "c", "d"], seeds=[1, 2, 3, 4], keep_output=True).outputs
    assert ex.captures == 8 and ex.replays > 40
    for a, b in zip(outs["emulated"], outs["eager"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
