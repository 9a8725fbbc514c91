"""What users rely on beyond parity: the staged API, flush, prompt changes, endless streams, new streams,
video files, the CLI, and clear errors for bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import synthetic_clip
from sdv2_lab.io.video import VideoWriter, export_video, load_video, probe_video

BASE = ["device=cpu", "height=32", "width=48", "vae=wan_tiny"]


def make(*overrides):
    torch.manual_seed(0)
    return build_pipeline(compose_config("config", BASE + list(overrides)))


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(41, 32, 48)[0]


def run_all(pipe, video, prompt="a red square", seed=7):
    torch.manual_seed(seed)
    pipe.start(prompt)
    return torch.cat([pipe.push(video), pipe.flush()])


@pytest.mark.parametrize("steps", [1, 3])
def test_single_emits_every_frame_and_flush_drains_the_batch(clip, steps):
    pipe = make(f"steps={steps}")
    torch.manual_seed(0)
    pipe.start("p")
    out = pipe.push(clip)
    # 41 frames = 5 + 9 chunks of 4; n-1 chunks are still in the stream batch before flush
    assert out.shape[0] == 41 - 4 * (steps - 1)
    rest = pipe.flush()
    assert rest.shape[0] == 4 * (steps - 1)
    assert out.min() >= 0 and out.max() <= 1 and out.shape[1:] == (32, 48, 3)


def test_chunking_is_independent_of_how_frames_arrive(clip):
    pipe = make("steps=2")
    whole = run_all(pipe, clip)
    torch.manual_seed(7)
    pipe.start("a red square")
    parts = [pipe.push(clip[:, i:i + 3]) for i in range(0, 41, 3)] + [pipe.flush()]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_new_stream_resets_all_state(clip):
    pipe = make("steps=2")
    a = run_all(pipe, clip)
    run_all(pipe, torch.flip(clip, dims=[1]), prompt="another prompt")
    b = run_all(pipe, clip)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prompt_change_mid_stream_only_changes_later_output(clip):
    pipe = make("steps=1")
    base = run_all(pipe, clip)
    torch.manual_seed(7)
    pipe.start("a red square")
    first = pipe.push(clip[:, :21])
    pipe.set_prompt("a blue circle")
    second = torch.cat([pipe.push(clip[:, 21:]), pipe.flush()])
    torch.testing.assert_close(first, base[:21], rtol=0, atol=0)
    assert not torch.allclose(second, base[21:])


def test_endless_stream_rebases_positions_and_memory_stays_flat():
    pipe = make("steps=2", "position_refresh_frames=12", "num_kv_cache=6")
    chunks = 30   # positions rebase every 12 latent frames and the 6-frame cache evicts from the 7th: both often
    video = synthetic_clip(1 + 4 * chunks, 32, 48)[0]
    torch.manual_seed(0)
    st = pipe.start("p")
    sizes, starts = [], []
    for i in range(chunks):
        pipe.push(video[:, (0 if i == 0 else 1 + 4 * i):5 + 4 * i])
        cache = pipe.cache
        starts.append(st.next_start // cache.spec.frame_tokens)
        sizes.append(sum(t.numel() for t in (cache.k, cache.v, cache.queue, st.dev.hidden)))
    assert max(starts) <= 12 + 1           # positions never run away (RoPE table bounded)
    assert len(set(sizes)) == 1            # no growth of cached state
    assert all(len(cache.rolling[r]) <= 6 for r in st.rows)


def test_t2v_generates_frames():
    pipe = make("steps=1", "t2v=true")
    torch.manual_seed(0)
    pipe.start("a sunrise")
    out = pipe.generate(17)
    assert out.shape[1:] == (32, 48, 3) and out.shape[0] >= 9


def test_staged_api_matches_push(clip, tmp_path):
    from sdv2_lab.api import StreamDiffusionV2Pipeline

    api = StreamDiffusionV2Pipeline(None, mode="single", height=32, width=48, step=2, device="cpu",
                                    overrides=["vae=wan_tiny"])
    torch.manual_seed(7)
    api.prepare("a red square")
    frames, scale = [], None
    for chunk in api.chunk_video(clip):
        enc = api.encode_chunk(clip, chunk, previous_noise_scale=scale)
        scale = enc.noise_scale
        den = api.denoise_chunk(enc)
        if den is not None:
            frames.append(api.decode_chunk(den))
    frames += api.flush()
    staged = np.concatenate(frames)
    pushed = run_all(api.pipeline, clip).numpy()
    assert staged.shape == pushed.shape == (41, 32, 48, 3)
    np.testing.assert_allclose(staged, pushed, rtol=0, atol=1e-6)


def test_bad_input_is_a_clear_error(clip, tmp_path):
    with pytest.raises(ValueError, match="multiples of 16.*nearest valid"):
        make("height=30")
    with pytest.raises(ValueError, match="steps=5"):
        make("steps=5")
    if torch.cuda.is_available():  # a GPU machine: a device index past the last GPU is the clear error
        with pytest.raises(RuntimeError, match="GPU\\(s\\) visible"):
            make(f"device=cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            make("device=cuda")
    pipe = make()
    with pytest.raises(RuntimeError, match="start\\(prompt\\)"):
        pipe.push(clip)
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.start("  ")
    pipe.start("p")
    with pytest.raises(ValueError, match="32x48"):
        pipe.push(torch.zeros(3, 5, 64, 96))
    with pytest.raises(ValueError, match="\\[3, T, H, W\\]"):
        pipe.push(torch.zeros(5, 3, 32, 48))
    pipe.push(clip[:, :3])
    with pytest.raises(ValueError, match="before the first chunk"):
        pipe.flush()
    from sdv2_lab.api import run_video_to_video
    with pytest.raises(FileNotFoundError, match="video not found"):   # checked before any process is started
        run_video_to_video(video_path=str(tmp_path / "x.mp4"), prompt="p", output_path=str(tmp_path / "y.mp4"),
                           mode="pipe", num_gpus=2)


def test_video_files_round_trip_and_atomic_writes(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    export_video(clip.permute(1, 2, 3, 0) * 0.5 + 0.5, path, fps=16)
    info = probe_video(path)
    assert (info.height, info.width, round(info.fps)) == (32, 48, 16)
    back = load_video(path)
    assert back.shape == clip.shape
    assert (back - clip).abs().mean() < 0.08          # H.264 is lossy, but close
    half = load_video(path, height=16, width=32, max_frames=5)
    assert half.shape == (3, 5, 16, 32)
    # a failure while writing leaves nothing behind
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(target, fps=8) as w:
            w.write(np.zeros((2, 32, 48, 3)))
            raise RuntimeError("crash mid-write")
    assert not target.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(FileNotFoundError, match="video not found"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read video"):
        load_video(tmp_path / "corrupt.mp4")


def test_cli_run_writes_video_and_timings(tmp_path):
    src = tmp_path / "in.mp4"
    export_video(synthetic_clip(13, 32, 48)[0].permute(1, 2, 3, 0) * 0.5 + 0.5, src)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("\na watercolor street\nignored second line\n")
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "run", *BASE, "input=file", f"input.video={src}",
           f"input.prompt_file={prompt}", f"hydra.run.dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "DUMMY weights" in res.stdout and "time to first frame" in res.stdout
    out = tmp_path / "run" / "output.mp4"
    assert probe_video(out).height == 32 and load_video(out).shape[1] == 13
    bad = subprocess.run(cmd[:-3] + [f"input.video={tmp_path / 'nope.mp4'}", "input.prompt=x",
                                     f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "video not found" in bad.stderr


def test_pipe_mode_is_a_clear_error_not_a_silent_single_gpu_run():
    """Several stages need their processes (the front ends launch them): building one here says so."""
    from sdv2_lab.build import build_pipeline, compose_config
    with pytest.raises(RuntimeError, match="mode=pipe with 2 stages runs one process per GPU"):
        build_pipeline(compose_config("config", ["mode=pipe"]))
    with pytest.raises(ValueError, match="mode=single runs on one GPU"):
        build_pipeline(compose_config("config", ["num_gpus=2"]))


def test_named_streams_are_cuda_only_and_say_so():
    # the lanes and the VAE capture streams come from one process-wide table (cuda_streams.py): asking for one on
    # a CPU device is a clear error, not a stream that silently does nothing
    from sdv2_lab.cuda_streams import named_stream
    with pytest.raises(ValueError, match=r"'lane:encode' asked for on cpu; only CUDA devices have streams"):
        named_stream(torch.device("cpu"), "lane:encode")
