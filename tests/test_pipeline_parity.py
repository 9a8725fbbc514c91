"""The streaming pipeline against the reference's own offline loops, end to end, same weights and noise.

Both sides: the tiny reference DiT weights, the same test VAE and prompt embedding, the global RNG seeded
alike (our pipeline draws re-noise in the reference's order). 30 chunks of a moving synthetic clip, so the
motion-aware noise controller changes the timestep every chunk. bf16, as the reference runs (it casts the
latents to bf16 unconditionally). Tolerance: every output frame within 2e-2 relative L2, the whole video
within 1e-2.
"""
import copy

import pytest
import torch

from dit_oracle import TINY, build_reference
from pipeline_oracle import PoolVAE, build_reference_runner, run_reference
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.stream.noise_controller import NoiseControllerConfig
from sdv2_lab.stream.pipeline import PipelineConfig, StreamPipeline

H, W = 32, 48
CHUNKS = 30
DT = torch.bfloat16


def moving_clip(frames, seed=0):
    """[1, 3, T, H, W] in [-1, 1]: a bright square moving with varying speed over a gradient."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    video = torch.empty(1, 3, frames, H, W)
    x = 0.0
    for t in range(frames):
        x += 0.5 + 3 * float(torch.rand(1, generator=g))
        img = torch.stack([0.5 * xx, 0.5 * yy, -0.3 * xx * yy])
        c = int(x) % (W - 8)
        img[:, 8:20, c:c + 8] = 0.9
        video[0, :, t] = img
    return video


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    ref = build_reference(**TINY)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in ref.state_dict().items()}}, path)
    return ref, path


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["single", "single-wo"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_pipeline_equals_reference(weights, monkeypatch, tmp_path, mode, steps):
    ref_dit, ckpt = weights
    ref_dit = copy.deepcopy(ref_dit).to(DT)
    video = moving_clip(1 + 4 * CHUNKS).to(DT)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, 512, 4096, generator=g).to(DT)
    noise_scale = 0.8 if mode == "single" else 0.7
    num_kv, sink, thr = 6, 3, 0.2

    runner = build_reference_runner(mode, ref_dit, PoolVAE().to(DT), prompt, steps, num_kv, sink, thr, H, W, DT)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(123)
    expected = torch.from_numpy(run_reference(monkeypatch, mode, video, runner, steps, noise_scale))

    dit = load_backbone(WanDiTConfig(name="tiny", **TINY), ckpt, dtype=DT)
    cfg = PipelineConfig(height=H, width=W, mode=mode, denoising_steps=[700, 500, 400, 200][:steps],
                         num_kv_cache=num_kv, sink_frames=sink, adapt_sink_threshold=thr,
                         noise=NoiseControllerConfig(noise_scale=noise_scale), reference_rng_order=True)
    pipe = StreamPipeline(dit, PoolVAE().to(DT), lambda p: prompt, cfg, device="cpu", dtype=DT)
    torch.manual_seed(123)
    pipe.start("p")
    ours = torch.cat([pipe.push(video[0, :, :7]), pipe.push(video[0, :, 7:]), pipe.flush()])  # uneven pushes

    assert ours.shape == expected.shape == (1 + 4 * CHUNKS, H, W, 3)
    per_frame = [rel(ours[i], expected[i]) for i in range(ours.shape[0])]
    assert max(per_frame) <= 2e-2, max(per_frame)
    assert rel(ours, expected) <= 1e-2
