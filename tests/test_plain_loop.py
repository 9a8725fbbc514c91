"""The plain loop (stream/plain_loop.py) states what the engine does: the same (chunk, timestep) per slot
in every DiT call as the real scheduler, and as the tiny pipeline's DiT calls; every finished chunk got all
timesteps in order, with the stream batch's fill latency (n-1 chunks) and flush."""
import pytest
import torch

from sdv2_lab.backbones.kv_cache import CacheSpec
from sdv2_lab.stream.plain_loop import EMPTY, plain_loop
from sdv2_lab.stream.scheduler import Scheduler

TIMESTEPS = [700, 500, 400, 200]
CHUNKS = 6
CASES = [(mode, steps) for mode in ("single", "single-wo") for steps in (1, 2, 3, 4)]


def plain_calls(mode, steps, chunks=CHUNKS):
    return list(plain_loop(lambda x, t, slot: x, TIMESTEPS[:steps], lambda x0, t: x0, lambda k: torch.zeros(1),
                           chunks, stream_batch=mode == "single"))


def scheduler_calls(mode, steps, chunks=CHUNKS):
    """(chunk id or EMPTY, timestep) per slot of every DiT call the real scheduler makes, and what finished.
    A slot's chunk is found by its virtual position (each chunk takes its own); unreal slots are EMPTY."""
    spec = CacheSpec(num_layers=1, num_heads=1, head_dim=2, frame_tokens=6, num_frames=6, sink_frames=3)
    sch = Scheduler(mode, TIMESTEPS[:steps], spec)
    s = sch.open("p")
    sch.feed(s, torch.zeros(3, 5 + 4 * (chunks - 1), 1, 1))
    calls, chunk_at, new = [], {}, []
    while (c := sch.next_chunk(s)) is not None:
        new.append(c)
        if len(new) == chunks:
            sch.flush(s)
        real_before = [c.real] + list(s.pending_real)
        (job,) = sch.dit_jobs([c])
        k = len(new) - 1 if c.real else EMPTY
        if not job.stream_batch:                            # all steps in turn on one row
            chunk_at[job.starts[0]] = k
            calls += [([(k, t)], k if p == job.passes - 1 else None) for p, t in enumerate(s.steps)]
            continue
        chunk_at.setdefault(job.starts[0], k)
        slots = [(chunk_at[start] if real else EMPTY, t) for start, real, t in zip(job.starts, real_before, s.steps)]
        calls.append((slots, slots[-1][0] if job.emit[0] else None))
    return calls


@pytest.mark.parametrize("mode,steps", CASES)
def test_every_dit_call_equals_the_schedulers(mode, steps):
    assert [(c.slots, c.finished) for c in plain_calls(mode, steps)] == scheduler_calls(mode, steps)


@pytest.mark.parametrize("mode,steps", CASES)
def test_fill_latency_and_flush(mode, steps):
    calls = plain_calls(mode, steps)
    finished = [c.finished for c in calls if c.finished is not None]
    assert finished == list(range(CHUNKS))                  # every chunk once, in order
    if mode == "single":   # chunk 0: n calls; chunks 1..: one call each, finished n-1 calls later; n-1 flush calls
        assert len(calls) == steps + (CHUNKS - 1) + (steps - 1)
        assert [c.finished for c in calls[steps:steps + steps - 1]] == [None] * (steps - 1)
    else:
        assert len(calls) == steps * CHUNKS


@pytest.mark.parametrize("mode,steps", CASES)
def test_a_finished_chunk_went_through_every_timestep_in_order(mode, steps):
    """A deterministic fake denoiser and re-noiser: each chunk's x0 equals its own all-steps recurrence."""
    ts = TIMESTEPS[:steps]
    denoise = lambda x, t, slot: 0.5 * x + t / 1000          # noqa: E731
    renoise = lambda x0, t: x0 + t / 10_000                  # noqa: E731
    latent = lambda k: torch.full((2,), float(k if k is not EMPTY else -1), dtype=torch.float64)  # noqa: E731
    out = {c.finished: c.x0 for c in plain_loop(denoise, ts, renoise, latent, CHUNKS, mode == "single")
           if c.finished is not None}
    for k in range(CHUNKS):
        x = latent(k)
        for i, t in enumerate(ts):
            x0 = denoise(x, t, 0)
            x = renoise(x0, ts[i + 1]) if i + 1 < steps else x
        torch.testing.assert_close(out[k], x0, rtol=0, atol=0)


def tiny_pipeline(mode, steps):
    from dit_oracle import TINY
    from stand_in_vae import PoolVAE
    from sdv2_lab.backbones.checkpoints import load_backbone
    from sdv2_lab.backbones.wan_dit import WanDiTConfig
    from sdv2_lab.stream.config import PipelineConfig
    from sdv2_lab.stream.noise_controller import NoiseControllerConfig
    from sdv2_lab.stream.pipeline import StreamPipeline
    from sdv2_lab.text.hashed import HashedTextEncoder

    torch.manual_seed(0)
    dit = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32, seed=0)
    cfg = PipelineConfig(height=32, width=48, mode=mode, denoising_steps=TIMESTEPS[:steps],
                         noise=NoiseControllerConfig(fixed=True))   # int(1000 * 0.8) - 100 = 700 = t_0
    return StreamPipeline(dit, PoolVAE(), HashedTextEncoder(), cfg, device="cpu", dtype=torch.float32)


def push_and_flush(pipe):
    from sdv2_lab.io.synthetic import synthetic_clip
    pipe.start("a plain loop")
    pipe.push(synthetic_clip(5 + 4 * (CHUNKS - 1), 32, 48, velocity=(0.7, 2.3))[0])
    pipe.flush()


@pytest.mark.parametrize("mode,steps", [("single", 1), ("single", 3), ("single-wo", 2)])
def test_the_tiny_pipelines_dit_calls_run_the_plain_loops_timesteps(mode, steps, monkeypatch):
    """The real driver and executors at the tiny size on CPU: the timestep of every row in every DiT call
    (the noise controller fixed, so slot 0 stays at t_0)."""
    pipe = tiny_pipeline(mode, steps)
    seen, step = [], pipe.dit.step

    def traced_step(x, t, cache, p):
        seen.append(t[:, 0].tolist())
        return step(x, t, cache, p)

    monkeypatch.setattr(pipe.dit, "step", traced_step)
    push_and_flush(pipe)
    assert seen == [[t for _, t in c.slots] for c in plain_calls(mode, steps)]


def fake_velocity(x, t):
    """A deterministic stand-in for the DiT: the same for a row alone or in a batch (elementwise)."""
    return 0.1 * x + (t / 1000).reshape(*t.shape, 1, 1, 1)


@pytest.mark.parametrize("mode,steps", [("single", 2), ("single", 4), ("single-wo", 3)])
def test_the_tiny_pipelines_finished_latents_equal_the_plain_loops(mode, steps, monkeypatch):
    """The real driver and executors with a fake DiT and zero noise draws (so re-noising is deterministic): the
    x0 of every finished chunk equals the plain loop's, fed the same chunk latents, bit for bit."""
    pipe = tiny_pipeline(mode, steps)
    d = pipe.driver
    monkeypatch.setattr(d, "_randn", lambda s, shape: torch.zeros(shape, dtype=d.dtype))
    monkeypatch.setattr(pipe.dit, "step", lambda x, t, cache, p: fake_velocity(x, t))
    latents, finished, run, denoise = [], [], d.executor.run, d.denoise

    def traced_run(job, x, t, noise):   # each real chunk's latent as it enters (slot 0)
        if job.chunks[0].real:
            latents.append(x[:1].clone())
        return run(job, x, t, noise)

    def traced_denoise(job, encoded):
        x0 = denoise(job, encoded)
        finished.extend(x.clone() for x, shown in zip(x0, job.emit) if shown)
        return x0

    monkeypatch.setattr(d.executor, "run", traced_run)
    monkeypatch.setattr(d, "denoise", traced_denoise)
    push_and_flush(pipe)
    sched = d.schedule

    def x0_of(x, t, slot):
        tt = torch.full(x.shape[:2], t)
        return sched.velocity_to_x0(fake_velocity(x, tt), x, tt)

    def renoise(x0, t):
        return sched.add_noise(x0, torch.zeros_like(x0), torch.full(x0.shape[:2], t))

    ours = [c.x0 for c in plain_loop(x0_of, TIMESTEPS[:steps], renoise,
                                     lambda k: latents[1] * 0 if k is EMPTY else latents[k], CHUNKS,
                                     stream_batch=mode == "single") if c.finished is not None]
    assert len(latents) == len(finished) == len(ours) == CHUNKS
    for k, (a, b) in enumerate(zip(finished, ours)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"chunk {k}")
