"""The stream engine: the scheduler's jobs equal the pre-engine pipeline's DiT calls one for one; streams
batched into one DiT call give each stream what it gets alone; chunking, flush and the KV-cache row pool."""
import json
from pathlib import Path

import pytest
import torch

from sdv2_lab.backbones import kv_cache
from sdv2_lab.backbones.kv_cache import CacheSpec
from dit_oracle import TINY
from stand_in_vae import PoolVAE
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.stream.config import PipelineConfig
from sdv2_lab.stream.driver import frames_of
from sdv2_lab.stream.pipeline import StreamPipeline
from sdv2_lab.stream.scheduler import Scheduler
from sdv2_lab.text.hashed import HashedTextEncoder

GOLDEN = json.loads((Path(__file__).parent / "golden" / "dit_calls.json").read_text())
H, W = 32, 48


def build(mode="single", steps=2, refresh=50, t2v=False, streams=1):
    """The tiny DiT with a cheap streaming stand-in VAE (the engine is under test here, not the VAE)."""
    torch.manual_seed(0)
    dit = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32, seed=0)
    cfg = PipelineConfig(height=H, width=W, mode=mode, denoising_steps=[700, 500, 400, 200][:steps],
                         position_refresh_frames=refresh, t2v=t2v, max_streams=streams)
    return StreamPipeline(dit, PoolVAE(), HashedTextEncoder(), cfg, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c['mode']}-{c['steps']}{'-t2v' if c['t2v'] else ''}")
def test_jobs_equal_the_pre_engine_call_sequence(case, monkeypatch):
    """Every DiT call: rows, virtual positions (rebased at ``refresh``), timesteps per row (the noise
    controller's included), which rows evict, which pop the ring; 64 chunks, eviction and rebasing."""
    calls = []
    original = kv_cache.StreamKVCache.plan

    def plan(self, *args, **kwargs):
        p = original(self, *args, **kwargs)
        calls.append({"rows": list(p.rows), "starts": list(p.starts), "tokens": p.num_tokens, "evict": list(p.evict),
                      "pop": [bool(x) for x in p.pop_mask.tolist()]})
        return p

    monkeypatch.setattr(kv_cache.StreamKVCache, "plan", plan)
    pipe = build(case["mode"], case["steps"], case["refresh"], case["t2v"])
    step = pipe.dit.step

    def traced_step(x, t, cache, p):
        calls[-1]["t"] = t[:, 0].tolist()
        return step(x, t, cache, p)

    monkeypatch.setattr(pipe.dit, "step", traced_step)
    torch.manual_seed(0)
    pipe.start("a long stream")
    if case["t2v"]:
        pipe.generate(4 * case["chunks"])
    else:
        pipe.push(synthetic_clip(1 + 4 * case["chunks"], H, W, velocity=(0.7, 2.3))[0])
        pipe.flush()
    expected = case["calls"]
    assert len(calls) == len(expected)
    assert any(any(c["evict"]) for c in expected)
    if case["chunks"] > case["refresh"]:   # positions were rebased (to num_kv_cache - 1 = 5 frames)
        assert any(c["starts"][0] == 5 * (H // 16) * (W // 16) for c in expected[8:])
    for i, (ours, ref) in enumerate(zip(calls, expected)):
        assert ours == ref, f"call {i}"


def run_streams(specs, *, steps=2, mode="single", leave_after=None):
    """Several streams through one driver, one DiT job per step. ``specs``: (seed, clip seed, prompt). A stream
    in ``leave_after`` {index: chunks} is closed after that many chunks. Returns each stream's frames."""
    pipe = build(mode, steps, 12, False, len(specs))
    d = pipe.driver
    clips = [synthetic_clip(1 + 4 * 16, H, W, seed=cs, velocity=(0.5 + cs, 1.7))[0] for _, cs, _ in specs]
    streams = [d.open(prompt, seed=seed) for seed, _, prompt in specs]
    outs = {s.id: [] for s in streams}
    for s, c in zip(streams, clips):
        d.feed(s, c)
    steps_done = 0
    while any(d.scheduler.ready(s) for s in streams if not s.closed):
        for o in d.step([s for s in streams if not s.closed]):
            outs[o.stream].append(o)
        steps_done += 1
        for i, n in (leave_after or {}).items():
            if steps_done == n and not streams[i].closed:
                d.close(streams[i])
    for s in streams:
        if not s.closed:
            outs[s.id] += d.flush(s)
    return [frames_of(outs[s.id], H, W, "cpu") for s in streams]


SPECS = [(11, 0, "a red square"), (22, 1, "a watercolor street"), (33, 2, "neon lights")]


@pytest.mark.parametrize("mode,steps", [("single", 2), ("single", 3), ("single-wo", 2)])
def test_streams_batched_in_one_dit_call_equal_each_stream_alone(mode, steps):
    alone = [run_streams([spec], steps=steps, mode=mode)[0] for spec in SPECS]
    for count in (2, 3):
        together = run_streams(SPECS[:count], steps=steps, mode=mode)
        for a, b in zip(alone, together):
            assert a.shape == b.shape == (65, H, W, 3)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)   # fp32 CPU: batched GEMMs may round differently


def test_a_stream_leaving_mid_way_does_not_disturb_the_others():
    alone = [run_streams([spec])[0] for spec in SPECS]
    together = run_streams(SPECS, leave_after={1: 6})
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2], alone[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], alone[1][: together[1].shape[0]], rtol=1e-5, atol=1e-5)
    assert together[1].shape[0] < alone[1].shape[0]


def test_a_new_stream_joins_into_freed_rows_and_is_independent():
    pipe = build("single", 2, 12, False, 2)
    d = pipe.driver
    a = d.open("a", seed=1)
    b = d.open("b", seed=2)
    with pytest.raises(RuntimeError, match="busy"):
        d.open("c")
    rows_b = list(b.rows)
    d.close(b)
    c = d.open("c", seed=3)
    assert c.rows == rows_b                                            # the freed rows are reused
    clip = synthetic_clip(21, H, W)[0]
    d.feed(a, clip)
    d.feed(c, clip)
    outs = {a.id: [], c.id: []}
    while d.scheduler.ready(a) or d.scheduler.ready(c):
        for o in d.step():
            outs[o.stream].append(o)
    outs[a.id] += d.flush(a)
    outs[c.id] += d.flush(c)
    alone = run_streams([(3, 0, "c")])  # same seed and prompt as c, no old state in its rows
    clip_c = synthetic_clip(21, H, W)[0]
    pipe2 = build("single", 2, 12, False)
    s = pipe2.driver.open("c", seed=3)
    ref = frames_of(pipe2.driver.push(s, clip_c) + pipe2.driver.flush(s), H, W, "cpu")
    torch.testing.assert_close(frames_of(outs[c.id], H, W, "cpu"), ref, rtol=1e-5, atol=1e-5)
    assert alone[0].shape[0] == 65


def test_config_is_validated_before_anything_is_built():
    with pytest.raises(ValueError, match="multiples of 16"):
        PipelineConfig(height=0).validate()
    with pytest.raises(ValueError, match="position_refresh_frames"):
        PipelineConfig(position_refresh_frames=3).validate()
    with pytest.raises(ValueError, match="position_refresh_frames"):
        PipelineConfig(position_refresh_frames=1023).validate()
    with pytest.raises(ValueError, match="num_kv_cache"):
        PipelineConfig(num_kv_cache=3, sink_frames=3).validate()
    with pytest.raises(ValueError, match="decreasing"):
        PipelineConfig(denoising_steps=[500, 700]).validate()
    with pytest.raises(ValueError, match="max_streams"):
        PipelineConfig(max_streams=0).validate()
    with pytest.raises(ValueError, match="rolling slot"):   # the dry run finds a cache that can never evict
        PipelineConfig(num_kv_cache=3, sink_frames=2, frames_per_block=1).validate()
    PipelineConfig(height=32, width=48).validate()


def test_scheduler_is_pure_logic_chunks_flush_and_rows():
    spec = CacheSpec(num_layers=1, num_heads=1, head_dim=2, frame_tokens=6, num_frames=6, sink_frames=3)
    sch = Scheduler("single", [700, 500, 400], spec, max_streams=2)
    s = sch.open("p")
    assert s.rows == [0, 1, 2] and sch.open("q").rows == [3, 4, 5]
    sch.feed(s, torch.zeros(3, 3, 1, 1))
    assert not sch.ready(s)
    sch.feed(s, torch.zeros(3, 10, 1, 1))                  # 13 frames: the first chunk (5) and two of 4
    chunks = [sch.next_chunk(s) for _ in range(3)]
    assert [c.frames.shape[2] for c in chunks] == [5, 4, 4] and sch.next_chunk(s) is None
    jobs = sch.dit_jobs(chunks[:1]) + sch.dit_jobs(chunks[1:2]) + sch.dit_jobs(chunks[2:])
    assert [j.passes for j in jobs] == [3, 1, 1] and jobs[0].first
    assert jobs[1].starts == [12, 12, 12] and jobs[2].starts == [18, 12, 12]  # slot 0 newest
    assert jobs[1].emit == [False] and jobs[2].emit == [False]               # warm-up placeholders leave
    assert sch.flush(s) == 0 and s.flush_calls == 2                          # two real chunks still in flight


def test_target_fps_grows_chunks_once_measured_with_the_clock(caplog):
    """An unreachable target: at the 4th output the stream is measured too slow and later chunks hold
    N - sink - 1 = 2 latent frames (8 input frames); a reachable one leaves the chunks alone."""
    for target, grown in ((1e9, 2), (1e-9, 1)):
        torch.manual_seed(0)
        dit = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32, seed=0)
        cfg = PipelineConfig(height=H, width=W, denoising_steps=[700, 500], target_fps=target)
        pipe = StreamPipeline(dit, PoolVAE(), HashedTextEncoder(), cfg, device="cpu", dtype=torch.float32)
        s = pipe.start("p")
        out = torch.cat([pipe.push(synthetic_clip(1 + 4 * 14, H, W)[0]), pipe.flush()])
        assert s.frames_per_block == grown and pipe.frames_needed() == 4 * grown
        assert out.shape[0] >= 1 + 4 * 12 and torch.isfinite(out).all()


def test_streams_with_their_own_steps_noise_scale_and_vae():
    """One engine, streams of 1 and 3 steps (rows 1 + 3 of its pool), their own noise level and VAE: each
    equals the same stream alone; a step count the engine does not have is refused clearly."""
    def engine():
        torch.manual_seed(0)
        dit = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32, seed=0)
        cfg = PipelineConfig(height=H, width=W, denoising_steps=[700, 500, 400], max_streams=2)
        return StreamPipeline(dit, PoolVAE(), HashedTextEncoder(), cfg, device="cpu", dtype=torch.float32).driver

    clip = synthetic_clip(1 + 4 * 10, H, W)[0]

    def alone(**kw):
        d = engine()
        s = d.open("p", seed=5, **kw)
        return frames_of(d.push(s, clip) + d.flush(s), H, W, "cpu")

    d = engine()
    a = d.open("p", seed=5, steps=1)
    b = d.open("p", seed=5, steps=3, noise_scale=0.6, vae=PoolVAE(seed=1))
    assert len(a.rows) == 1 and len(b.rows) == 3
    outs = {a.id: [], b.id: []}
    d.feed(a, clip)
    d.feed(b, clip)
    while d.scheduler.ready(a) or d.scheduler.ready(b):
        for o in d.step():
            outs[o.stream].append(o)
    outs[a.id] += d.flush(a)
    outs[b.id] += d.flush(b)
    torch.testing.assert_close(frames_of(outs[a.id], H, W, "cpu"), alone(steps=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frames_of(outs[b.id], H, W, "cpu"),
                               alone(steps=3, noise_scale=0.6, vae=PoolVAE(seed=1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="steps=5"):
        d.open("p", steps=5)


@pytest.mark.parametrize("steps", [2, 3])
def test_graph_executor_replays_equal_eager(steps):
    """The CUDA-graph executor, emulated on CPU (a replay re-runs the captured call with the objects of its
    capture): two streams in one stream batch over 30 chunks (the cache fills, then evicts; rows of different slots
    reach it on different jobs) equal the eager executor within 1e-5 (static plans mask rather than skip)."""
    from sdv2_lab.stream.clips import stream_clips
    clips = [synthetic_clip(1 + 4 * 30, H, W, seed=s)[0] for s in (1, 2)]
    outs = {}
    for name in ("eager", "emulated"):
        pipe = build(steps=steps, streams=2)
        if name == "emulated":
            from sdv2_lab.stream.executor import CUDAGraphExecutor
            ex = CUDAGraphExecutor(pipe.dit, pipe.executor.cache, pipe.executor.schedule, emulate=True)
            pipe.executor = pipe.driver.executor = ex
        outs[name] = stream_clips(pipe, clips, ["a red square", "neon"], seeds=[3, 4], keep_output=True).outputs
    assert ex.replays > 20 and ex.captures >= 2
    for a, b in zip(outs["eager"], outs["emulated"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_static_plans_attend_over_the_whole_cache_with_the_unwritten_part_masked():
    """The CUDA-graph executor's plans while the cache fills (one shape for every call) give the same velocity
    as the exact-length plans, over a stream with eviction (fp32, 1e-5)."""
    torch.manual_seed(0)
    dit = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32, seed=0)
    caches = [dit.new_cache(2, H, W, 6, 3, 0.2) for _ in range(2)]
    emb = torch.randn(1, 512, 4096)
    S = caches[0].spec.frame_tokens
    for c in caches:
        dit.set_prompt(c, emb)
    g = torch.Generator().manual_seed(1)
    for k in range(12):
        f, starts = (2, [0, 0]) if k == 0 else (1, [(k + 1) * S, k * S])
        x = torch.randn(2, f, 16, H // 8, W // 8, generator=g)
        t = torch.full((2, f), 700)
        outs = []
        for c, static in zip(caches, (False, True)):
            plan = dit.plan(x, c, starts, static=static)
            assert plan.max_len == (c.spec.size if static else max(plan.new_local_end))
            outs.append(dit.step(x, t, c, plan))
            c.commit(plan)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_every_executor_is_an_executor():
    """The driver's one interface: the eager and graph executors and a pipe stage all declare it."""
    from sdv2_lab.parallel.stage import PipeStage
    from sdv2_lab.stream.executor import EXECUTORS, Executor
    for cls in [EXECUTORS.get(n) for n in ("eager", "cuda_graph")] + [PipeStage]:
        missing = [m for m in ("set_prompt", "reset_rows", "copy_rows", "run", "release", "device")
                   if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    assert issubclass(PipeStage, EXECUTORS.get("eager")) and isinstance(Executor, type)
