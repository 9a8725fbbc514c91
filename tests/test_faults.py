"""The engine under bad input and at numeric edges: the adaptive sink refresh decides in fp32 (a similarity one
bf16 ulp from the threshold decides as the exact value does), a prompt of the wrong type is named, non-finite
or out-of-range frames get an error naming the stream, chunk and frame (or are clamped, opted in), and a
stream whose input was bad never poisons a later stream or its neighbours in the same DiT call."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from sdv2_lab.backbones.kv_cache import CacheSpec, StreamKVCache


# ---------------------------------------------------------------------------------------------- sink refresh
def _exact_similarity(k_sink, v_sink, k_new, v_new) -> float:
    """The refresh similarity of one sink frame, in float64 from the bf16 values."""
    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    ks, vs = k_sink.double().flatten(1).mean(0), v_sink.double().flatten(1).mean(0)
    kc, vc = k_new.double().flatten(1).mean(0), v_new.double().flatten(1).mean(0)
    return (cos(ks, kc) + cos(vs, vc)) / 2


def _bf16_similarity(k_sink, v_sink, k_new, v_new) -> float:
    """What a bf16 computation gives (the reference's, and this cache's before the fix)."""
    def mean(t):
        return t.reshape(1, -1, t.shape[-2] * t.shape[-1]).mean(1)
    sim = (torch.cosine_similarity(mean(k_sink), mean(k_new), dim=-1)
           + torch.cosine_similarity(mean(v_sink), mean(v_new), dim=-1)) / 2
    return float(sim)


def _refresh_fires(k_sink, v_sink, k_new, v_new, threshold: float) -> bool:
    """One refresh check through the cache: a one-frame chunk after a written sink frame."""
    S, H, dh = k_sink.shape[0], k_sink.shape[1], k_sink.shape[2]
    spec = CacheSpec(num_layers=1, num_heads=H, head_dim=dh, frame_tokens=S, num_frames=4, sink_frames=1,
                     refresh_threshold=threshold)
    cache = StreamKVCache(spec, 1, torch.bfloat16, "cpu")
    cache.k[0, 0, :S], cache.v[0, 0, :S] = k_sink, v_sink
    cache.global_end[0] = cache.local_end[0] = S        # frame 0 (the sink) is written
    plan = cache.plan([S], S)
    assert plan.refresh_check
    cache.update(0, plan, k_new[None], v_new[None])
    return S in cache.queue_contents(0, 0)              # a refresh queues the sink slot's end


def test_sink_refresh_decides_in_fp32_near_the_threshold():
    """Chunks whose exact similarity lies within one bf16 ulp of the threshold, on either side: the decision is
    the exact value's, where a bf16 computation decides the other way."""
    S, H, dh = 4, 2, 16
    g = torch.Generator().manual_seed(0)
    flips = 0
    for trial in range(40):
        base = torch.randn(S, H, dh, generator=g)
        k_sink = base.bfloat16()
        v_sink = (base + torch.randn(S, H, dh, generator=g)).bfloat16()
        k_new = (0.6 * base + torch.randn(S, H, dh, generator=g)).bfloat16()
        v_new = (0.6 * base + torch.randn(S, H, dh, generator=g)).bfloat16()
        exact = _exact_similarity(k_sink, v_sink, k_new, v_new)
        rounded = _bf16_similarity(k_sink, v_sink, k_new, v_new)
        if abs(rounded - exact) < 1e-4:
            continue
        # the threshold between the two: the exact value and the bf16 one fall on opposite sides of it
        threshold = (exact + rounded) / 2
        assert _refresh_fires(k_sink, v_sink, k_new, v_new, threshold) == (exact < threshold), \
            (trial, exact, rounded, threshold)
        flips += 1
    assert flips >= 5, f"only {flips} trials had a bf16 similarity off by more than 1e-4 (the test needs cases)"
    # and far from the threshold both agree
    k = torch.randn(S, H, dh, generator=g).bfloat16()
    assert _refresh_fires(k, k, k, k, 0.5) is False and _refresh_fires(k, k, -k, -k, 0.5) is True


# ---------------------------------------------------------------------------------------------- engines
from stand_in_vae import PoolVAE  # noqa: E402

from sdv2_lab.backbones.checkpoints import load_backbone  # noqa: E402
from sdv2_lab.backbones.wan_dit import WanDiTConfig  # noqa: E402
from sdv2_lab.build import build_pipeline, compose_config  # noqa: E402
from sdv2_lab.settings import pipeline_config  # noqa: E402
from sdv2_lab.io.synthetic import synthetic_clip  # noqa: E402
from sdv2_lab.stream.clips import stream_clip  # noqa: E402
from sdv2_lab.stream.config import PipelineConfig  # noqa: E402
from sdv2_lab.stream.input_guard import InputError, StreamRefused  # noqa: E402
from sdv2_lab.stream.pipeline import StreamPipeline  # noqa: E402
from sdv2_lab.text.hashed import HashedTextEncoder  # noqa: E402

H, W = 32, 48


def small(**cfg) -> StreamPipeline:
    """A small DiT, the stand-in VAE, the hashed text encoder: the engine's whole path in a fraction of a second."""
    dit = load_backbone(WanDiTConfig(name="small", dim=64, ffn_dim=128, num_heads=1, num_layers=2), "dummy",
                        dtype=torch.float32, seed=0)
    cfg = {"max_streams": 2, **cfg}
    return StreamPipeline(dit, PoolVAE(), HashedTextEncoder(), PipelineConfig(height=H, width=W, **cfg),
                          device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def engine():
    return small()


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(17, H, W)[0]          # chunks: frames 0-4, 5-8, 9-12, 13-16


def poisoned(clip, how: str, frame: int = 14) -> torch.Tensor:
    bad = clip.clone()
    if how == "nan_frame":
        bad[:, frame] = float("nan")
    elif how == "nan_pixel":
        bad[1, frame, 3, 7] = float("nan")
    elif how == "inf_frame":
        bad[:, frame] = float("inf")
    elif how == "huge_frame":
        bad[:, frame] = 1e6
    return bad


# ---------------------------------------------------------------------------------------------- prompts
def test_a_prompt_of_the_wrong_type_is_named(engine):
    for bad, name in ((None, "NoneType"), (123, "int"), (["a", "b"], "list")):
        with pytest.raises(TypeError, match=f"the prompt must be a string .*got {name}"):
            engine.start(bad)
        assert not engine.driver.scheduler.streams          # nothing was held
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.start("  ")
    s = engine.start("a red square")
    with pytest.raises(TypeError, match="got int"):
        engine.set_prompt(123)
    assert s.prompt == "a red square"
    engine.driver.close(s)
    engine.stream = None


# ---------------------------------------------------------------------------------------------- bad frames
def test_a_nan_frame_mid_stream_is_an_error_and_the_next_stream_is_clean():
    """Through the configured pipeline (sdv2 run's build): the error names the stream, the chunk and the frame;
    the next stream on the same pipeline gives what it gives on a fresh one."""
    torch.manual_seed(0)
    pipe = build_pipeline(compose_config("config", ["device=cpu", f"height={H}", f"width={W}", "steps=1"]))
    video = synthetic_clip(13, H, W)[0]
    clean, _ = stream_clip(pipe, video, "a red square", seed=1)
    with pytest.raises(InputError, match=r"stream \d+: input chunk 2, frame 10 \(counting from 0 in the stream\) "
                                         r"has NaN.*input_guard=clamp.*The stream was stopped"):
        stream_clip(pipe, poisoned(video, "nan_frame", frame=10), "a red square", seed=1)
    assert not pipe.driver.scheduler.streams                          # its rows came back
    again, _ = stream_clip(pipe, video, "a red square", seed=1)
    assert torch.isfinite(again).all() and torch.equal(again, clean)


@pytest.mark.parametrize("how,what", [("nan_pixel", "has NaN"), ("inf_frame", "has an infinite value"),
                                      ("huge_frame", r"has values up to \|x\| = 1e\+06, outside \[-1, 1\]")])
def test_every_kind_of_bad_frame_is_named(engine, clip, how, what):
    clean, _ = stream_clip(engine, clip, "a red square", seed=1)
    with pytest.raises(InputError, match=rf"input chunk 3, frame 14 \(counting from 0 in the stream\) {what}"):
        stream_clip(engine, poisoned(clip, how), "a red square", seed=1)
    again, _ = stream_clip(engine, clip, "a red square", seed=1)
    assert torch.equal(again, clean)


def test_neighbours_in_one_dit_call_are_unaffected_and_the_bad_stream_never_goes_nan(engine, clip):
    """Two streams in one batched DiT call, one poisoned mid-stream: the other's frames are those it makes beside a
    clean neighbour; the poisoned stream's state stays finite (its bad values were replaced before the VAE), and
    reading its output is the error."""
    def run(second):
        d = engine.driver
        a, b = d.open("a red square", seed=1), d.open("neon lights", seed=2)
        outs = {a.id: [], b.id: []}
        try:
            for k in (0, 5, 9, 13):
                n = 5 if k == 0 else 4
                d.feed(a, clip[:, k:k + n])
                d.feed(b, second[:, k:k + n])
                for o in d.step([a, b]):
                    outs[o.stream].append(o)
            for s in (a, b):
                for o in d.flush(s):
                    outs[o.stream].append(o)
        finally:
            d.close(a)
            d.close(b)
        return outs[a.id], outs[b.id]

    ref_a, ref_b = run(clip)
    got_a, got_b = run(poisoned(clip, "nan_frame"))
    assert [o.frames.shape[0] for o in got_a] == [o.frames.shape[0] for o in ref_a] == [5, 4, 4, 4]
    for x, y in zip(got_a, ref_a):
        engine.driver.verify(x)                                        # the clean stream: no error
        assert torch.equal(x.frames, y.frames)
    assert all(torch.isfinite(o.frames).all() for o in got_b)        # never NaN, before or after the bad frame
    assert torch.equal(got_b[0].frames, ref_b[0].frames)              # before the bad chunk: as if clean
    engine.driver.verify(got_b[0])   # a snapshot holds the record as of its decode: chunk 0's saw nothing yet
    with pytest.raises(InputError, match=r"input chunk 3, frame 14"):
        engine.driver.verify(got_b[-1])


def test_a_refused_stream_takes_no_more_frames(engine, clip):
    d = engine.driver
    s = d.open("a red square", seed=1)
    try:
        outs = d.push(s, poisoned(clip, "inf_frame", frame=6))
        with pytest.raises(InputError, match="input chunk 1, frame 6"):
            for o in outs:
                d.verify(o)
        with pytest.raises(StreamRefused, match=rf"stream {s.id} was stopped after bad numbers .*open a new stream"):
            d.feed(s, clip[:, :4])
        assert d.step([s]) == []                                     # skipped, not run
    finally:
        d.close(s)


def test_clamp_mode_zeroes_and_clamps_with_one_warning(clip, caplog):
    pipe = small(input_guard="clamp")
    bad = poisoned(clip, "nan_pixel", frame=6)
    bad[:, 11] = float("-inf")
    bad[0, 15] = 7.0
    fixed = torch.nan_to_num(bad, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    want, _ = stream_clip(pipe, fixed, "a red square", seed=1)
    with caplog.at_level("WARNING", logger="sdv2_lab.stream.input_guard"):
        got, _ = stream_clip(pipe, bad, "a red square", seed=1)
    assert torch.equal(got, want)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sdv2_lab.stream.input_guard"]
    assert len(warnings) == 1 and "input chunk 1, frame 6" in warnings[0] and "input_guard=clamp" in warnings[0]


def test_the_guard_reads_no_device_value_per_chunk(engine, clip, monkeypatch):
    """The records are read only where a chunk is read: stepping a stream never turns a device value into a
    Python value (on a GPU that would be a host sync per chunk)."""
    d = engine.driver
    s = d.open("a red square", seed=1)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _r=real, _n=name, **k: (reads.append(_n), _r(self, *a, **k))[1])
    try:
        d.feed(s, poisoned(clip, "nan_frame"))
        outs = []
        while d.scheduler.ready(s):
            outs += d.step([s])
        assert len(outs) == 3 and reads == [], reads
    finally:
        monkeypatch.undo()
        d.close(s)
    with pytest.raises(InputError):
        d.verify(outs[-1])


def test_settings_are_checked(clip):
    for override, msg in (("input_guard=zero", "input_guard='zero': expected one of raise, clamp, off"),
                          ("input_limit=0.5", "input_limit=0.5")):
        with pytest.raises(ValueError, match=msg):
            pipeline_config(compose_config("config", [override])).validate()
    off = small(input_guard="off")
    s = off.start("p")
    out = off.push(poisoned(clip, "nan_frame", frame=6))            # nothing checked, nothing replaced
    assert torch.isnan(out).any()
    off.driver.verify(s)


def test_the_staged_api_names_the_chunk():
    from sdv2_lab import StreamDiffusionV2Pipeline
    api = StreamDiffusionV2Pipeline(None, height=H, width=W, step=1)
    video = poisoned(synthetic_clip(13, H, W)[0], "nan_pixel", frame=10)
    api.prepare("a watercolor painting")
    noise = None
    with pytest.raises(InputError, match=r"input chunk 2, frame 10"):
        for chunk in api.chunk_video(video):
            encoded = api.encode_chunk(video, chunk, previous_noise_scale=noise)
            noise = encoded.noise_scale
            assert math.isfinite(noise)                              # the controller never saw a NaN level
            denoised = api.denoise_chunk(encoded)
            if denoised is not None:
                api.decode_chunk(denoised)
    chunk = api.chunk_video(video)[2]
    with pytest.raises(StreamRefused, match="open a new stream"):    # the stopped stream takes no more chunks
        api.encode_chunk(video, chunk, previous_noise_scale=noise)
    api.prepare("a watercolor painting")                              # a new stream runs clean
    out = api(synthetic_clip(13, H, W)[0])
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- memory
def test_close_gives_back_every_tensor_at_once():
    """``close()`` frees the models, the KV cache and the streams' states while the caller still holds the
    pipeline (on a GPU: memory_allocated back to its start, experiments/check_memory.py)."""
    import gc
    import weakref
    pipe = small(max_streams=1)
    stream_clip(pipe, synthetic_clip(13, H, W)[0], "a red square", seed=1)
    pipe.start("still open")
    pipe.push(synthetic_clip(9, H, W)[0])
    tensors = [*pipe.dit.parameters(), *pipe.vae.parameters(), pipe.executor.cache.k, pipe.executor.cache.v,
               pipe.executor.cache.cross_k]
    refs = [weakref.ref(t) for t in tensors]
    modules = [weakref.ref(m) for m in (pipe.dit, pipe.vae, pipe.driver, pipe.executor)]
    del tensors
    gc.disable()   # what close() itself frees, not what a later collection would
    try:
        pipe.close()
        assert all(r() is None for r in refs), f"{sum(r() is not None for r in refs)} tensors still alive"
        assert all(m() is None for m in modules)
    finally:
        gc.enable()
