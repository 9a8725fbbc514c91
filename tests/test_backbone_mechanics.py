"""The KV rebuild mechanics of the plugin recipes (sdv2_lab/stream/kv_rebuild.py), run in the real engine at the tiny
size and checked against the mechanic stated directly with the DiT and a fresh cache:

* LongLive's KV recache: after a prompt switch, the stream's cache holds its latest clean latents written again
  under the new prompt (NVlabs/LongLive ``_recache_after_switch``: the cache reset, the last frames run at t = 0
  with the new prompt under a block-causal mask, the next block after them);
* Krea's per-block KV recompute: before every later block the cache holds only the last 3 clean latent frames,
  written again at t = 0 (Scope's ``RecomputeKVCacheBlock``, ``kv_cache_num_frames`` 3)."""
from typing import Optional

import pytest
import torch

from sdv2_lab.backbones.kv_cache import StreamKVCache
from sdv2_lab.backbones.wan_dit import apply_rope
from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.settings import pipeline_config
from sdv2_lab.units import tokens_per_latent_frame

H, W = 32, 48
S = tokens_per_latent_frame(H, W)
TINY = ["backbone=tiny", f"height={H}", f"width={W}", "warmup=false", "mode=single_wo", "t2v=true", "steps=1"]


def traced_pipeline(overrides, record):
    """A pipeline of ``overrides`` whose noise draws are zero and whose every DiT call appends ``record(x, t, plan,
    velocity)`` to the returned list."""
    pipe = build_pipeline(compose_config("config", overrides))
    d = pipe.driver
    d._randn = lambda s, shape: torch.zeros(shape, dtype=d.dtype)
    calls, step = [], pipe.dit.step

    def traced(x, t, cache, plan):
        out = step(x, t, cache, plan)
        calls.append(record(x, t, plan, out))
        return out

    pipe.dit.step = traced
    return pipe, calls


def traced_stream(overrides, chunks: int, switch_at=None):
    """T2V chunks of one stream (noise draws zero), the prompt switched before chunk ``switch_at``; every DiT call
    as (input, timesteps, starts, velocity), the calls' index where each chunk began, and each chunk's x0 as the
    engine emitted it."""
    pipe, calls = traced_pipeline(TINY + overrides,
                                  lambda x, t, plan, out: (x.clone(), t.clone(), list(plan.starts), out.clone()))
    d = pipe.driver
    emitted, denoise = [], d.denoise

    def kept(job, encoded):
        out = denoise(job, encoded)
        emitted.extend(x.clone() for x in out)
        return out

    d.denoise = kept
    s = d.open("a red kite over the sea", seed=0)
    marks = []
    pipe.test_outputs = []   # each chunk's decoded frames [T, H, W, 3] in [0, 1]
    for k in range(chunks):
        if k == switch_at:
            marks.append(("switch", len(calls)))
            d.set_prompt(s, "a city street at night")
        marks.append((k, len(calls)))
        pipe.test_outputs += [o.frames.clone() for o in d._run([d.scheduler.noise_chunk(s)])]
    return pipe, calls, dict(marks), emitted


def fresh_stream_velocity(pipe, prompt: str, context: torch.Tensor, block_x, block_t, start: int,
                          sink_prompt: Optional[str] = None):
    """The mechanic stated directly: a fresh KV row with ``prompt``; ``context`` [1, K, C, h, w] written at t = 0
    in blocks of 3 from position 0 (the sink's blocks under ``sink_prompt`` when given); then the DiT's velocity
    for ``block_x`` at ``block_t`` at ``start``."""
    dit = pipe.dit
    spec = pipe.driver.executor.cache.spec
    cache = StreamKVCache(spec, rows=1, dtype=block_x.dtype, device=block_x.device)
    embed = lambda p: pipe.text_encoder.encode(p).to(block_x.dtype)   # noqa: E731
    dit.set_prompt(cache, embed(sink_prompt or prompt), [0])
    pos = 0
    for block in context.split(3, dim=1):
        if pos == spec.sink_tokens and sink_prompt:
            dit.set_prompt(cache, embed(prompt), [0])
        plan = dit.plan(block, cache, [pos], [0], [False])
        type(dit).step(dit, block, torch.zeros(1, block.shape[1], dtype=block_t.dtype), cache, plan)
        cache.commit(plan)
        pos += block.shape[1] * S
    assert pos == start
    if sink_prompt:
        dit.set_prompt(cache, embed(prompt), [0])
    plan = dit.plan(block_x, cache, [start], [0], [False])
    return type(dit).step(dit, block_x, block_t, cache, plan)   # not the traced one


@pytest.mark.parametrize("global_sink", [True, False])
def test_longlive_recache_rewrites_the_history_under_the_new_prompt(global_sink):
    """Switched after 6 blocks (18 latent frames, more than the 12-frame cache holds): the cache is rebuilt from
    the stream's first 3 frames (its sink) and its latest 9, in blocks of 3 from position 0. With the global sink
    (LongLive's recipe) the sink keeps its keys from before the switch: the latest 9 are written under the new
    prompt attending to the sink as the old prompt wrote it (LongLive never writes the sink region in a recache)."""
    pipe, calls, marks, emitted = traced_stream(["backbone/recipe=longlive", f"kv_recache_global_sink={global_sink}"],
                                                chunks=7, switch_at=6)
    cfg = pipe.driver.cfg
    assert (cfg.kv_recache, cfg.kv_rebuild, cfg.num_kv_cache, cfg.sink_frames) == (True, "recache", 12, 3)
    assert cfg.kv_recache_global_sink is global_sink
    history = [emitted[0], *emitted[3:6]]                          # sink + the latest 9 frames, 3 per block
    replay = calls[marks["switch"]:marks[6]]
    assert [c[2] for c in replay] == [[0], [3 * S], [6 * S], [9 * S]]
    for (x, t, _, _), want in zip(replay, history):
        assert float(t.abs().max()) == 0.0
        torch.testing.assert_close(x, want, rtol=0, atol=0)
    # the next block follows them, and sees what a fresh stream under the new prompt with that history sees
    x, t, starts, v = calls[marks[6]]
    assert starts == [12 * S]
    old = "a red kite over the sea" if global_sink else None
    want = fresh_stream_velocity(pipe, "a city street at night", torch.cat(history, dim=1), x, t, 12 * S,
                                 sink_prompt=old)
    torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-5)
    other = fresh_stream_velocity(pipe, "a city street at night", torch.cat(history, dim=1), x, t, 12 * S,
                                  sink_prompt=None if global_sink else "a red kite over the sea")
    assert not torch.allclose(v, other, atol=1e-4)                 # the two sinks differ in what follows


def test_the_global_sink_needs_a_fixed_sink_of_whole_blocks():
    with pytest.raises(ValueError, match="kv_recache_global_sink=true .* multiple of frames_per_block"):
        pipeline_config(compose_config("config", TINY + ["backbone/recipe=longlive", "sink_frames=2"])).validate()
    with pytest.raises(ValueError, match="adapt_sink_threshold=-1"):
        pipeline_config(compose_config("config", TINY + ["backbone/recipe=longlive",
                                                         "adapt_sink_threshold=0.2"])).validate()
    # a modifier of the recache: without it, nothing to check
    pipeline_config(compose_config("config", TINY + ["backbone/recipe=longlive", "kv_recache=false",
                                                     "sink_frames=2"])).validate()


def test_without_the_recache_the_old_prompts_keys_stay():
    """The same stream with kv_recache=false: no replay calls, the next block at its old position, and an output
    that differs from the recache's (the mechanic changes what the model sees)."""
    pipe, calls, marks, _ = traced_stream(["backbone/recipe=longlive", "kv_recache=false"], chunks=4, switch_at=3)
    assert marks["switch"] == marks[3] and calls[marks[3]][2] == [9 * S]
    _, rcalls, rmarks, _ = traced_stream(["backbone/recipe=longlive"], chunks=4, switch_at=3)
    assert not torch.allclose(calls[marks[3]][3], rcalls[rmarks[3]][3], atol=1e-4)
    for k in range(3):   # before the switch both streams are the same
        torch.testing.assert_close(calls[marks[k]][3], rcalls[rmarks[k]][3], rtol=0, atol=0)


@pytest.mark.parametrize("reencode", [True, False])
def test_krea_recomputes_the_context_before_every_block(reencode):
    """Before block k the cache is the last block's 3 clean frames at t = 0 from position 0. With the recipe's
    re-encode (Scope's ``get_context_frames``), from block 2 on the oldest of them is its last decoded video frame
    (frame 3 of the last block's output) encoded alone by a fresh VAE stream; at block 1 it is the stream's own
    first latent, as it left the DiT."""
    pipe, calls, marks, emitted = traced_stream(["backbone/recipe=krea", f"kv_recompute_reencode={reencode}"],
                                                chunks=4)
    cfg = pipe.driver.cfg
    assert (cfg.kv_recompute_frames, cfg.kv_rebuild, cfg.num_kv_cache, cfg.sink_frames, cfg.context_pass) == \
        (3, "recompute", 6, 0, False)
    steps = [1000, 0]                                                 # its first step + T2V's final clean step
    vae = pipe.driver.vae
    for k in range(1, 4):
        block = calls[marks[k]:marks[k + 1] if k + 1 in marks else None]
        assert len(block) == 1 + len(steps)                           # the recompute, then the block's steps
        (cx, ct, cstart, _), first = block[0], block[1]
        previous = emitted[k - 1].clone()                             # the last block's clean frames
        if reencode and k >= 2:
            frame = pipe.test_outputs[k - 1][3].permute(2, 0, 1) * 2 - 1   # [3, H, W] in [-1, 1]
            image_latent = vae.encode(vae.new_state(), frame[None, :, None].to(previous.dtype))
            assert not torch.allclose(image_latent, previous[:, :1], atol=1e-3)   # the re-encode changes it
            previous[:, :1] = image_latent
        assert cstart == [0] and float(ct.abs().max()) == 0.0
        torch.testing.assert_close(cx, previous, rtol=1e-5, atol=1e-5)
        x, t, starts, v = first
        assert starts == [3 * S] and [float(c[1].flatten()[0]) for c in block[1:]] == steps
        want = fresh_stream_velocity(pipe, "a red kite over the sea", previous, x, t, 3 * S)
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-5)


def test_the_rebuild_runs_in_single_wo_only_and_its_context_must_fit():
    single = pipeline_config(compose_config("config", ["backbone=longlive"])).validate()
    assert single.kv_rebuild is None and "mode=single_wo" in single.kv_rebuild_note
    wo = pipeline_config(compose_config("config", ["backbone=krea_14b", "mode=single_wo"])).validate()
    assert wo.kv_rebuild == "recompute" and wo.kv_rebuild_note is None
    with pytest.raises(ValueError, match=r"kv_recompute_frames=4 must be in \[sink_frames=0, num_kv_cache - chunk = 3\]"):
        pipeline_config(compose_config("config", ["backbone=krea_14b", "mode=single_wo",
                                                  "kv_recompute_frames=4"])).validate()
    with pytest.raises(ValueError, match="kv_recompute_frames must be 0"):
        pipeline_config(compose_config("config", ["backbone=tiny", "kv_recompute_frames=-1"])).validate()
    with pytest.raises(ValueError, match="kv_recompute_reencode=true .* needs kv_recompute_frames > 0"):
        pipeline_config(compose_config("config", ["backbone=tiny", "kv_recompute_reencode=true"])).validate()


# ---------------------------------------------------------------------------------------------- the EMA sink
def test_move_keys_equals_unroping_and_roping_at_the_new_position():
    """The EMA sink moves post-RoPE keys in time: the same as undoing the rotation at the old positions and
    applying it at the new ones (the DiT's own phasors), in float64 arithmetic up to fp32 phasors."""
    pipe = build_pipeline(compose_config("config", TINY))
    dit = pipe.dit
    h, w = H // 16, W // 16
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3 * h * w, dit.cfg.num_heads, dit.cfg.head_dim, generator=g)
    old, new = torch.tensor([40, 7]), torch.tensor([0, 1])
    roped = apply_rope(k, dit.rope(old, 3, h, w, k.device))
    want = apply_rope(k, dit.rope(new, 3, h, w, k.device))
    frames = (new - old)[:, None] + torch.zeros(1, 3, dtype=torch.long)
    torch.testing.assert_close(dit.move_keys(roped, frames), want, rtol=1e-5, atol=1e-5)


def test_the_ema_sink_folds_each_evicted_chunk_into_the_sink():
    """Reward Forcing's recipe at the tiny size (a 12-frame window, a 3-frame EMA sink, blocks of 3): on each
    chunk that evicts, the sink's keys become 0.999 sink + 0.001 (the evicted chunk's keys moved to the sink's
    positions), its values the same without the move; before the first eviction the stream is the fixed-sink one."""
    pipe = build_pipeline(compose_config("config", TINY + ["backbone/recipe=reward_forcing"]))
    d, cache = pipe.driver, pipe.driver.executor.cache
    assert cache.spec.sink_ema == 0.999 and (cache.spec.num_frames, cache.spec.sink_frames) == (12, 3)
    d._randn = lambda s, shape: torch.zeros(shape, dtype=d.dtype)
    s = d.open("a red kite over the sea", seed=0)
    sink, sd = slice(0, 3 * S), 3 * S
    folds = 0
    for k in range(7):
        row = s.rows[0]
        full = cache.local_end[row] >= cache.spec.size
        before_k, before_v = cache.k[:, row].clone(), cache.v[:, row].clone()
        pos = cache.pos[:, row].clone()
        target = [cache.queue_contents(li, row)[0] for li in range(cache.k.shape[0])] if full else None
        d._run([d.scheduler.noise_chunk(s)])
        if not full:   # appending chunks leave the sink as the first chunk wrote it
            if k:
                torch.testing.assert_close(cache.k[:, row, sink], before_k[:, sink], rtol=0, atol=0)
            continue
        folds += 1
        for li in range(cache.k.shape[0]):
            slot = slice(target[li] - sd, target[li])
            moved = pipe.dit.move_keys(before_k[li, slot][None], (pos[li, :3] - pos[li, slot.start // S:slot.stop // S])[None])[0]
            want_k = (0.999 * before_k[li, sink].double() + 0.001 * moved.double()).to(cache.k.dtype)
            want_v = (0.999 * before_v[li, sink].double() + 0.001 * before_v[li, slot].double()).to(cache.v.dtype)
            torch.testing.assert_close(cache.k[li, row, sink], want_k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache.v[li, row, sink], want_v, rtol=1e-5, atol=1e-6)
    assert folds == 3                          # chunks 4, 5, 6 evicted (the window holds 4 chunks of 3)
    assert pos[0, :3].tolist() == [0, 1, 2]    # the sink stays at its positions


def stream_v2v_with_a_prompt_switch(pipe, chunks_before: int, chunks_after: int):
    """V2V through the front door (push, set_prompt, flush): the first chunk and ``chunks_before`` chunks under one
    prompt, ``chunks_after`` under another. Returns every output frame and the KV-rebuild replay jobs run."""
    from sdv2_lab.io.synthetic import synthetic_clip
    replays, run = [], pipe.driver.executor.run
    pipe.driver.executor.run = lambda job, *a: (replays.append(job) if not job.chunks and not job.stream_batch
                                                else None) or run(job, *a)
    cfg = pipe.driver.cfg
    frames = cfg.first_chunk_frames + cfg.chunk_frames * (chunks_before + chunks_after)
    clip = synthetic_clip(frames, H, W, velocity=(0.7, 2.3))[0]
    pipe.start("a red kite over the sea")
    half = cfg.first_chunk_frames + cfg.chunk_frames * chunks_before
    out = [pipe.push(clip[:, :half])]
    pipe.set_prompt("a city street at night")
    out += [pipe.push(clip[:, half:]), pipe.flush()]
    out = torch.cat([o for o in out if len(o)])
    assert out.shape == (frames, H, W, 3) and torch.isfinite(out).all()
    return out, replays


@pytest.mark.parametrize("recipe", ["longlive", "krea", "reward_forcing"])
def test_the_mechanics_stream_video_to_video_with_a_prompt_switch(recipe):
    """V2V through the front door (push, set_prompt, flush) in single-wo with each mechanic on: every input frame
    comes out, finite, and the rebuild ran where the recipe has one."""
    pipe = build_pipeline(compose_config("config", [o for o in TINY if o not in ("t2v=true", "steps=1")] +
                                         [f"backbone/recipe={recipe}", "steps=1"]))
    _, replays = stream_v2v_with_a_prompt_switch(pipe, 3, 2)
    want = {"longlive": 4, "krea": 5, "reward_forcing": 0}[recipe]   # the 12-frame window once; one per later chunk
    assert len(replays) == want


def test_the_run_line_says_which_mechanics_run():
    from sdv2_lab.settings import describe_paths
    assert "KV recache on a prompt switch" in describe_paths(compose_config("config", ["backbone=longlive",
                                                                                       "mode=single_wo"]))
    assert "KV" not in describe_paths(compose_config("config", ["backbone=longlive"]))   # a stream batch keeps it
    assert "KV recomputed before every chunk" in describe_paths(compose_config("config", ["backbone=krea_14b",
                                                                                          "mode=single_wo"]))
    assert "EMA sink (0.999)" in describe_paths(compose_config("config", ["backbone=reward_forcing"]))


# ------------------------------------------------------------------ Krea's KV attention bias
def reference_attention(q, k, v, kv_lens, key_bias):
    """softmax(q k^T / sqrt(d) + bias) v in float64, keys at or past each row's length left out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))           # [B, H, L, D]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + key_bias.double()[:, None, None, :]
    valid = torch.arange(k.shape[2])[None, :] < kv_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_with_a_key_bias_equals_float64(backend):
    from sdv2_lab.backbones.attention import get_attention
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g) for n in (5, 12, 12))
    bias = torch.where(torch.rand(2, 12, generator=g) < 0.5, -1.2, 0.0)
    lens = torch.tensor([12, 7])
    want = reference_attention(q, k, v, lens, bias)
    got = get_attention(backend).attend(q, k, v, lens, key_bias=bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    plain = get_attention(backend).attend(q, k, v, lens)            # and the bias changes what comes out
    assert not torch.allclose(plain, got, atol=1e-3)


def test_the_key_bias_falls_on_the_past_frames_only():
    """log(b) on every key but the cache's first frame and the tokens the call itself wrote (found here by what
    changed in the cache): appending calls while the cache fills, then calls that evict."""
    import math
    from sdv2_lab.backbones.kv_cache import CacheSpec
    spec = CacheSpec(num_layers=1, num_heads=1, head_dim=4, frame_tokens=2, num_frames=6, sink_frames=0,
                     key_bias=0.3)
    cache = StreamKVCache(spec, 2, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    m = 3 * spec.frame_tokens                                            # blocks of 3 latent frames
    for call in range(5):
        before = cache.k[0].clone()
        plan = cache.plan([call * m, call * m], m, static=True)
        k = torch.randn(2, m, 1, 4, generator=g)
        _, _, _, bias = cache.update(0, plan, k, torch.randn(2, m, 1, 4, generator=g))
        cache.commit(plan)
        for r in range(2):
            stored = cache.k[0][r, :, 0]
            own = torch.zeros(spec.size, dtype=torch.bool)
            for i in range(m):                                           # where this call's keys went
                hit = (stored == k[r, i, 0]).all(-1) & ~(before[r, :, 0] == k[r, i, 0]).all(-1)
                assert int(hit.sum()) == 1
                own |= hit
            want = torch.full((spec.size,), math.log(0.3))
            want[own] = 0.0
            want[:spec.frame_tokens] = 0.0
            torch.testing.assert_close(bias[r], want)
        assert bias.shape == (2, spec.size)
    off = StreamKVCache(CacheSpec(num_layers=1, num_heads=1, head_dim=4, frame_tokens=2, num_frames=6), 1,
                        torch.float32, "cpu")
    plan = off.plan([0], m)
    assert off.update(0, plan, torch.zeros(1, m, 1, 4), torch.zeros(1, m, 1, 4))[3] is None   # 1 = off: no bias


def test_krea_streams_with_its_kv_attention_bias():
    """The recipe's 0.3 reaches attention: the same stream with the bias off (1.0) differs from the second block on
    (the first attends to itself only), and the two backends that take a bias give the same stream."""
    from sdv2_lab.settings import describe_paths
    pipe, calls, marks, _ = traced_stream(["backbone/recipe=krea"], chunks=3)
    assert pipe.driver.executor.cache.spec.key_bias == pytest.approx(0.3)
    assert "KV attention bias 0.3" in describe_paths(compose_config("config", TINY + ["backbone/recipe=krea"]))
    _, off, off_marks, _ = traced_stream(["backbone/recipe=krea", "kv_attention_bias=1.0"], chunks=3)
    torch.testing.assert_close(calls[marks[0]][3], off[off_marks[0]][3], rtol=0, atol=0)
    assert not torch.allclose(calls[marks[1] + 1][3], off[off_marks[1] + 1][3], atol=1e-4)
    _, flex, flex_marks, _ = traced_stream(["backbone/recipe=krea", "attention=flex"], chunks=3)
    for a, b in zip(calls, flex):
        torch.testing.assert_close(a[3], b[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_a_kv_attention_bias_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"kv_attention_bias must be in \(0, 1\] \(1 = off"):
        pipeline_config(compose_config("config", TINY + [f"kv_attention_bias={value}"])).validate()


def test_backends_without_a_key_bias_refuse_it_in_one_line():
    """flash_attn and fa4 have no additive bias: the build refuses the setting with them, and a call that gets one
    anyway (the backend switched later) says which backends take it."""
    from dataclasses import replace
    from sdv2_lab.backbones.attention import flash_attention_backend, fa4_attention, get_attention
    pipe = build_pipeline(compose_config("config", TINY))
    dit = pipe.dit
    dit.attention_backend = replace(get_attention("sdpa"), name="flash_attn", takes_key_bias=False)
    with pytest.raises(ValueError, match="kv_attention_bias=0.3 .* needs attention=sdpa or flex, not flash_attn"):
        dit.new_cache(1, H, W, 6, key_bias=0.3)
    dit.new_cache(1, H, W, 6)                                          # without the bias it builds
    q = torch.zeros(1, 2, 1, 4)
    for fn, name in ((flash_attention_backend, "flash_attn"), (fa4_attention, "fa4")):
        with pytest.raises(ValueError, match=f"attention={name} takes no key bias"):
            fn(q, q, q, None, key_bias=torch.zeros(1, 2))


@pytest.mark.parametrize("recipe", ["sdv2", "self_forcing", "longlive", "krea", "reward_forcing", "memflow"])
def test_graphed_passes_equal_eager_in_single_wo(recipe):
    """The CUDA-graph executor replays each pass of a later all-steps chunk (emulated on CPU: a replay re-runs the
    captured call with the objects of its capture, so a per-pass fact a real graph would bake in is stale here
    too): a V2V stream with a prompt switch, past the cache's fill and through its eviction, equals the eager
    executor within 1e-5, with each recipe's mechanics on (sink refresh, context pass, global sink and KV recache,
    key bias and per-block recompute, EMA sink, the memory bank)."""
    from sdv2_lab.stream.executor import CUDAGraphExecutor
    overrides = [o for o in TINY if o not in ("t2v=true", "steps=1")] + [f"backbone/recipe={recipe}", "steps=2"]
    outs, graphs = {}, None
    for name in ("eager", "emulated"):
        torch.manual_seed(0)
        pipe = build_pipeline(compose_config("config", overrides))
        cfg = pipe.driver.cfg
        if name == "emulated":
            ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
            pipe.executor = pipe.driver.executor = ex
        chunks = max(6, cfg.num_kv_cache // cfg.frames_per_block + 3)    # fills the cache, then evicts
        if cfg.memory:
            chunks = max(chunks, 3 * cfg.memory_frames * cfg.memory_record_interval)   # the full bank replaces
        outs[name], _ = stream_v2v_with_a_prompt_switch(pipe, chunks - 2, 2)
        graphs = pipe.driver.executor
    assert graphs.captures >= 1 and graphs.replays > graphs.captures   # the passes did replay
    torch.testing.assert_close(outs["emulated"], outs["eager"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["single_wo", "single"])
def test_a_first_chunk_after_the_warm_up_replays_its_graphs(mode):
    """TTFF: the warm-up stream captures the first chunk's passes too, so a user's first chunk replays them (no
    eager call, no capture in the first user-visible chunk), in a model's own loop and in the stream batch."""
    from sdv2_lab.stream.executor import CUDAGraphExecutor
    recipe = "self_forcing" if mode == "single_wo" else "sdv2"
    pipe = build_pipeline(compose_config("config", ["backbone=tiny", f"backbone/recipe={recipe}", f"mode={mode}",
                                                    f"height={H}", f"width={W}", "warmup=false"]))
    ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
    pipe.executor = pipe.driver.executor = ex
    pipe.warm_up()
    captures, replays, eager = ex.captures, ex.replays, []
    step = pipe.dit.step
    ex._capture_pass = lambda *a: pytest.fail("a capture in the user's first chunk")
    pipe.dit.step = lambda *a: eager.append(1) or step(*a)      # a replay of an emulated graph calls it too
    cfg = pipe.driver.cfg
    pipe.start("a red kite")
    pipe.push(torch.rand(3, cfg.first_chunk_frames, H, W) * 2 - 1)
    passes = len(cfg.first_step_list) + int(cfg.context_pass)
    assert ex.captures == captures and ex.replays == replays + passes and len(eager) == passes


def test_eight_streams_first_chunks_after_the_warm_up_replay_without_a_capture():
    """With more streams than the executor's usual 6 graphs, the warm-up's first-chunk graphs (one per stream's
    first row) are all kept, so no user's first chunk recaptures one."""
    from sdv2_lab.stream.executor import CUDAGraphExecutor
    pipe = build_pipeline(compose_config("config", ["backbone=tiny", "mode=single", "streams=8", "steps=1",
                                                    f"height={H}", f"width={W}", "warmup=false"]))
    ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
    pipe.executor = pipe.driver.executor = ex
    pipe.warm_up()
    captures, d = ex.captures, pipe.driver
    streams = [d.open(f"prompt {i}", seed=i) for i in range(8)]
    for s in streams:
        d.push(s, torch.rand(3, d.cfg.first_chunk_frames, H, W) * 2 - 1)
    assert ex.captures == captures
