"""The seed's staged API at the engine's speed (issue 17), checked on a CPU: no per-chunk work on the whole video,
no host read of the noise scale, the engine's frames, and the seed's other doors (close / with, encode_video,
denoise_chunks, decode_chunks, StreamVideoToVideo, enable_acceleration switching what the driver runs)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from sdv2_lab.api import NoiseScale, StreamDiffusionV2Pipeline, StreamVideoToVideo
from sdv2_lab.io.synthetic import synthetic_clip, write_synthetic_clip
from sdv2_lab.io.video import load_video, probe_video
from sdv2_lab.stream.clips import stream_clip

H, W = 32, 48
ARGS = dict(height=H, width=W, device="cpu", step=2)
META = {"__getitem__", "__get__", "dim", "size", "numel", "element_size", "is_floating_point", "data_ptr",
        "untyped_storage", "__len__", "__format__", "__repr__", "is_contiguous", "stride", "storage_offset"}


@pytest.fixture(scope="module")
def api():
    with StreamDiffusionV2Pipeline(None, **ARGS) as pipe:
        yield pipe


def seed_loop(api, video, prompt="a dog walks on the grass"):
    """The seed README's loop, verbatim in its calls (with flush: the chunks still in the stream batch)."""
    api.prepare(prompt)
    decoded_chunks, noise_scale = [], api.noise_scale
    for video_chunk in api.chunk_video(video):
        encoded_chunk = api.encode_chunk(video, video_chunk, previous_noise_scale=noise_scale,
                                         initial_noise_scale=api.noise_scale)
        noise_scale = encoded_chunk.noise_scale
        denoised_chunk = api.denoise_chunk(encoded_chunk)
        if denoised_chunk is None:
            continue
        decoded_chunks.append(api.decode_chunk(denoised_chunk))
    decoded_chunks += api.flush()
    return np.concatenate(decoded_chunks, axis=0)


class WholeVideoOps(TorchFunctionMode):
    """Counts the non-view operations that read most of a video's storage (a scan, a copy, a cast of it)."""

    def __init__(self, video: torch.Tensor):
        super().__init__()
        self.storage, self.numel, self.ops = video.untyped_storage().data_ptr(), video.numel(), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in META:
            for a in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(a, torch.Tensor) and a.numel() * 2 > self.numel and not a.is_meta \
                        and a.untyped_storage().data_ptr() == self.storage:
                    self.ops.append(name)
        return func(*args, **(kwargs or {}))


def chunk_costs(api, video, chunks=4):
    """Per chunk: the host bytes handed to the engine, and operations that read most of the video."""
    api.prepare("p")
    parts = api.chunk_video(video)
    costs, scale = [], api.noise_scale
    for chunk in parts[:chunks]:
        before = api.host_to_device_bytes
        with WholeVideoOps(video) as mode:
            enc = api.encode_chunk(video, chunk, previous_noise_scale=scale, initial_noise_scale=api.noise_scale)
            scale = enc.noise_scale
            den = api.denoise_chunk(enc)
            if den is not None:
                api.decode_chunk(den)
        costs.append((api.host_to_device_bytes - before, mode.ops))
    return costs


def test_per_chunk_work_does_not_grow_with_the_video(api):
    """The old encode_chunk re-scanned (min/max) and re-copied every frame of the video for every chunk: O(T^2)."""
    short, long = chunk_costs(api, synthetic_clip(17, H, W)[0]), chunk_costs(api, synthetic_clip(65, H, W)[0])
    assert short == long                                           # the same bytes and operations per chunk
    frame = 3 * H * W * 4
    assert [b for b, _ in short] == [5 * frame] + [5 * frame] * 3  # the chunk's frames (+ the frame before it)
    assert all(ops == [] for _, ops in short)                      # nothing reads the whole video


def test_a_file_is_loaded_once_and_a_tensor_checked_once(api, tmp_path, monkeypatch):
    import sdv2_lab.api
    write_synthetic_clip(tmp_path / "in.mp4", frames=9, height=H, width=W)
    loads = []
    real = sdv2_lab.api.load_video
    monkeypatch.setattr(sdv2_lab.api, "load_video", lambda *a, **k: loads.append(1) or real(*a, **k))
    api.prepare("p")
    path = str(tmp_path / "in.mp4")
    chunks = api.chunk_video(path)
    for chunk in chunks:
        api.denoise_chunk(api.encode_chunk(path, chunk))
    assert loads == [1]
    video = synthetic_clip(9, H, W)[0]
    assert api.chunk_video(video)[0].frames.data_ptr() == video.data_ptr()   # views: nothing copied
    from sdv2_lab.stream.input_guard import InputError
    with pytest.raises(InputError, match=r"input chunk 0, frame \d+ .*outside \[-1, 1\]"):   # checked on the device
        api.prepare("p")
        bad = video * 3
        api.decode_chunk(api.denoise_chunk(api.encode_chunk(bad, api.chunk_video(bad)[0])))


def test_passing_the_noise_scale_back_reads_nothing_from_the_device(api, monkeypatch):
    video = synthetic_clip(21, H, W)[0]
    reads = []
    monkeypatch.setattr(NoiseScale, "__float__", lambda self: reads.append(1) or 0.0)
    seed_loop(api, video)
    assert reads == []                                             # the loop never waited on a scale
    monkeypatch.undo()
    api.prepare("p")
    chunks = api.chunk_video(video)
    first = api.encode_chunk(video, chunks[0])
    second = api.encode_chunk(video, chunks[1], previous_noise_scale=first.noise_scale)
    assert float(first.noise_scale) == pytest.approx(0.8)           # the first chunk gets s0
    assert 0.7 < float(second.noise_scale) <= 0.8 and f"{second.noise_scale:.2f}".startswith("0.")
    assert second.noise_scale * 1 == float(second.noise_scale) and second.noise_scale <= 1.0


def test_the_seed_loop_gives_the_engines_frames(api, tmp_path):
    write_synthetic_clip(tmp_path / "in.mp4", frames=21, height=H, width=W)
    video = load_video(tmp_path / "in.mp4", height=H, width=W)     # a CPU tensor, as the seed's loop has it
    torch.manual_seed(3)
    staged = seed_loop(api, video)
    torch.manual_seed(3)
    engine, _ = stream_clip(api.pipeline, video, "a dog walks on the grass")
    assert staged.shape == (21, H, W, 3) and staged.dtype == np.float32
    np.testing.assert_array_equal(staged, engine.numpy())


def test_whole_video_calls_give_every_frame(api):
    video = synthetic_clip(17, H, W)[0]
    api.prepare("a prompt")
    encoded = api.encode_video(video)
    assert len(encoded) == 4 and encoded[0].first and not encoded[1].first
    denoised = api.denoise_chunks(encoded)
    assert len(denoised) == 4                                      # the stream batch drained too
    frames = api.decode_chunks(denoised)
    assert frames.shape == (17, H, W, 3) and 0 <= frames.min() and frames.max() <= 1
    whole = api(video, progress=False)
    assert whole.shape == frames.shape
    with pytest.raises(ValueError, match="must not be empty"):
        api.decode_chunks([])


def test_close_and_with():
    with StreamDiffusionV2Pipeline(None, **ARGS) as pipe:
        pipe.prepare("p")
    assert pipe.pipeline is None
    with pytest.raises(RuntimeError, match="closed"):
        pipe.prepare("p")
    pipe.close()                                                    # twice is fine


def test_enable_acceleration_switches_what_the_driver_runs():
    from sdv2_lab.stream.executor import CUDAGraphExecutor, DiTExecutor
    from sdv2_lab.vae.taehv import TAEHVVAE
    pipe = StreamDiffusionV2Pipeline(None, **ARGS)
    dit = pipe.pipeline.dit
    pipe.prepare("p")
    pipe.enable_acceleration(fast=True)
    driver = pipe.pipeline.driver
    assert isinstance(driver.vae, TAEHVVAE) and driver.vae is pipe.pipeline.vae
    spec = driver.executor.cache.spec
    assert (spec.num_frames, spec.sink_frames) == (5, 2) and driver.scheduler.kv is spec
    assert driver.cfg.adapt_sink_threshold == -1 and driver.executor.dit is dit   # the DiT was kept
    assert type(driver.executor) is DiTExecutor                                   # a CPU: eager
    assert pipe.pipeline.state is not None and pipe.pipeline.state.dev.vae is driver.vae   # the restarted stream
    out = seed_loop(pipe, synthetic_clip(13, H, W)[0])
    assert out.shape == (13, H, W, 3)
    # on CUDA the same switch runs the graph executor: the executor the config names for that device
    from sdv2_lab.build import compose_config
    from sdv2_lab.settings import pipeline_config
    from sdv2_lab.seed_config import seed_overrides
    from sdv2_lab.stream.pipeline import executor_name
    cuda_cfg = compose_config("config", seed_overrides(device="cuda", fast=True, height=H, width=W))
    assert executor_name(pipeline_config(cuda_cfg), torch.device("cuda")) == "cuda_graph"
    assert pipeline_config(cuda_cfg).overlap and not pipeline_config(pipe.cfg).overlap   # auto: on for CUDA only
    assert CUDAGraphExecutor.name == "cuda_graph"
    pipe.enable_acceleration()                                                     # flags replace, as the seed
    assert pipe.pipeline.driver.executor.cache.spec.num_frames == 6 and pipe.cfg.vae.name == "wan"
    pipe.close()


def test_stream_video_to_video_keeps_its_pipeline(tmp_path):
    write_synthetic_clip(tmp_path / "in.mp4", frames=13, height=H, width=W)
    with StreamVideoToVideo(None, mode="single", **ARGS) as runner:
        out = runner.run_video(tmp_path / "in.mp4", "a watercolor", tmp_path / "out.mp4")
        assert probe_video(out).frames == 13
        built = runner._pipe
        video = runner.generate(tmp_path / "in.mp4", "a watercolor")
        assert runner._pipe is built                                 # built once
        assert video.shape == (3, 13, H, W) and 0 <= video.min() and video.max() <= 255 and video.max() > 1
    assert runner._pipe is None
    with pytest.raises(TypeError, match="unknown option"):
        StreamVideoToVideo(None, heigth=32)


def test_the_api_says_what_runs_and_shows_progress(tmp_path):
    """A script without logging set up: one line per build / switch on stderr, and a progress bar."""
    code = textwrap.dedent(f"""
        from sdv2_lab import StreamDiffusionV2Pipeline
        from sdv2_lab.io.synthetic import synthetic_clip
        s = StreamDiffusionV2Pipeline(None, height={H}, width={W}, device="cpu", step=1)
        s.prepare("p")
        s(synthetic_clip(9, {H}, {W})[0])
        s.enable_acceleration(use_taehv=True)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sdv2_lab: ")]
    assert len(lines) == 2, res.stderr
    assert "DiT eager" in lines[0] and "DUMMY weights" in lines[0] and "checkpoint_folder=" in lines[0]
    assert lines[1].startswith("sdv2_lab: enable_acceleration: VAE wan -> taehv")
    assert "restyled frames" in res.stderr and "9/9" in res.stderr             # the progress bar


@pytest.mark.parametrize("model, mode", [("rolling_forcing", "single"), ("memflow", "single-wo")])
def test_the_seed_loop_streams_the_plugin_backbones(model, mode):
    """The seed's loop on a backbone with its own mechanics (the 5-block rolling window; the memory bank) gives
    the engine's frames, every frame of the clip."""
    tiny = ["backbone.dim=256", "backbone.ffn_dim=512", "backbone.num_heads=2", "backbone.num_layers=2"]
    with StreamDiffusionV2Pipeline(None, height=H, width=W, device="cpu", model=model, mode=mode,
                                   overrides=tiny) as pipe:
        assert pipe.num_steps == (5 if model == "rolling_forcing" else 4)
        video = synthetic_clip(pipe.first_chunk_size + pipe.chunk_size * 6, H, W)[0]
        torch.manual_seed(3)
        staged = seed_loop(pipe, video)
        torch.manual_seed(3)
        engine, _ = stream_clip(pipe.pipeline, video, "a dog walks on the grass")
        assert staged.shape == (video.shape[1], H, W, 3)
        np.testing.assert_array_equal(staged, engine.numpy())
