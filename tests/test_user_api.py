"""The seed's Python usage, verbatim but for the package name, on a complete tiny checkpoint in the official layout.

The seed's documented loops are taken from the published wheel's README (its package metadata: the test oracle
installed by .ci/install) and from our own docstring (sdv2_lab/api.py). They run in the checkpoint's root, so
that the seed's relative paths (ckpts/wan_causal_dmd_v2v, examples/original.mp4, outputs/...) resolve as
written. Two things are changed: the import line, and the size (480x832 -> 32x48: CPU test time).
"""
import importlib.metadata
import logging
import re
import textwrap

import pytest

from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.io.video import probe_video
from test_user_checkpoint import CKPT, copy_layout, tiny_root  # noqa: F401  (the session fixture)

H, W = 32, 48
FRAMES = 17                       # 1 + 4 x 4: four chunks
SEED_SIZE = "height=480, width=832"
SMALL = f"height={H}, width={W}"


def seed_readme_blocks() -> list[str]:
    try:
        text = importlib.metadata.metadata("streamdiffusionv2").get_payload()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the reference wheel (test oracle) is not installed: bash .ci/install")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def seed_loop(mode: str) -> str:
    """The seed README's block for ``mode``, with only the import and the size changed."""
    block = next(b for b in seed_readme_blocks() if f'mode="{mode}"' in b and "chunk_video" in b)
    return ours(block, (f'mode="{mode}",', f'mode="{mode}", {SMALL},'), (SEED_SIZE, SMALL))


def ours(code: str, *changes: tuple[str, str]) -> str:
    """The seed's code with the package name changed, and ``changes`` (the size) made; each must apply."""
    changed = code.replace("from streamdiffusionv2 import", "from sdv2_lab import")
    for old, new in changes:
        assert old in changed, f"the seed's text changed: {old!r} not found"
        changed = changed.replace(old, new)
    return changed


@pytest.fixture
def in_root(tiny_root, tmp_path, monkeypatch):
    """A copy of the tiny checkpoint root as the working directory, with examples/original.mp4. Its files are hard
    links: nothing here writes into the checkpoint's files (outputs/ and examples/ are folders of the copy's own)."""
    root = copy_layout(tiny_root, tmp_path / "root", link=True)
    write_synthetic_clip(root / "examples" / "original.mp4", frames=FRAMES, height=H, width=W)
    monkeypatch.chdir(root)
    return root


def frames_of(path) -> int:
    return probe_video(path).frames


def test_the_seeds_import_works():
    from sdv2_lab import StreamDiffusionV2Pipeline, export_video, load_video, run_video_to_video  # noqa: F401
    assert StreamDiffusionV2Pipeline.__module__ == "sdv2_lab.api"


@pytest.mark.parametrize("mode", ["single", "single-wo"])
def test_the_seeds_documented_loop_runs_on_real_checkpoint_files(in_root, mode, caplog):
    caplog.set_level(logging.WARNING)
    exec(compile(seed_loop(mode), f"seed README ({mode})", "exec"), {})
    out = in_root / "outputs" / ("python_single.mp4" if mode == "single" else "python_single_wo.mp4")
    # the seed's loop has no flush: in `single` with 2 steps the last chunk stays in the stream batch
    assert frames_of(out) == (FRAMES - 4 if mode == "single" else FRAMES)
    assert "DUMMY" not in caplog.text   # every part comes from the checkpoint files


def test_the_seeds_loop_after_enable_acceleration_fast(in_root, caplog):
    constructor = 'StreamDiffusionV2Pipeline(checkpoint_folder="ckpts/wan_causal_dmd_v2v")'
    setup = next(b for b in seed_readme_blocks() if "enable_acceleration(fast=True)" in b)
    setup = ours(setup, (constructor, constructor[:-1] + f", {SMALL})"))
    loop = seed_loop("single")
    caplog.set_level(logging.INFO, logger="sdv2_lab.api")
    scope = {}
    imports = loop[:loop.index("stream = ")]   # the loop block's imports (numpy, load_video, export_video)
    exec(compile(imports + setup + loop[loop.index("video = load_video"):], "seed README (fast)", "exec"), scope)
    stream = scope["stream"]
    assert stream.cfg.vae.name == "taehv" and type(stream.pipeline.vae).__name__ == "TAEHVVAE"
    assert (stream.pipeline.cfg.num_kv_cache, stream.pipeline.cfg.sink_frames,
            stream.pipeline.cfg.adapt_sink_threshold) == (5, 2, -1)
    assert frames_of(in_root / "outputs" / "python_single.mp4") == FRAMES - 4
    switched = [r.getMessage() for r in caplog.records if "enable_acceleration" in r.getMessage()]
    assert len(switched) == 1 and "VAE wan -> taehv" in switched[0] and "KV cache frames 6 -> 5" in switched[0]


def test_our_documented_loop_with_flush_keeps_every_frame(in_root):
    """The loop in sdv2_lab/api.py's docstring (its flush returns the chunks still in the stream batch)."""
    import sdv2_lab.api
    doc = textwrap.dedent(sdv2_lab.api.__doc__.split("\n\n", 1)[1].split("\n\nEverything runs")[0])
    code = ours(doc, ('mode="single")', f'mode="single", {SMALL})'), (SEED_SIZE, SMALL))
    exec(compile(code, "sdv2_lab.api docstring", "exec"), {})
    assert frames_of(in_root / "outputs" / "output.mp4") == FRAMES


def test_enable_acceleration_switches_in_place(in_root):
    from sdv2_lab import StreamDiffusionV2Pipeline
    stream = StreamDiffusionV2Pipeline(checkpoint_folder=CKPT, height=H, width=W, step=1)
    dit, text = stream.pipeline.dit, stream.pipeline.text_encoder
    assert not stream.pipeline.weights_are_dummy and type(text).__name__ == "TextEncoder"   # UMT5, not hashed
    stream.prepare("a prompt")
    stream.enable_acceleration(fast=True)
    assert stream.pipeline.dit is dit and stream.pipeline.text_encoder is text   # no second copy of the models
    assert stream.pipeline.state is not None                                     # the stream restarted
    stream.enable_acceleration()                                                 # as the seed: flags replace
    assert stream.cfg.vae.name == "wan" and stream.pipeline.cfg.num_kv_cache == 6


def test_overrides_are_applied_last(in_root):
    from sdv2_lab import StreamDiffusionV2Pipeline
    stream = StreamDiffusionV2Pipeline(None, height=H, width=W, device="cpu", overrides=["num_kv_cache=8", "steps=1"])
    assert stream.cfg.num_kv_cache == 8 and stream.num_steps == 1 and stream.pipeline.weights_are_dummy


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=0), r"height and width must be positive multiples of 16.*0x48"),
    (dict(height=30), r"multiples of 16.*nearest valid: 32x48"),
    (dict(step=7), r"steps=7: expected an integer from 1 to 4"),
    (dict(step=0), r"step must be a positive integer"),
    (dict(step=6, model="rolling_forcing"), r"steps=6: expected an integer from 1 to 5"),
    (dict(overrides=["position_refresh_frames=5000"]), r"position_refresh_frames=5000"),
    (dict(overrides=["num_kv_cache=2"]), r"num_kv_cache=2"),
])
def test_bad_settings_fail_before_any_model_is_built(in_root, monkeypatch, kwargs, match):
    import sdv2_lab.build
    from sdv2_lab import StreamDiffusionV2Pipeline

    def no_build(cfg):
        raise AssertionError("a model was built before the settings were checked")
    monkeypatch.setattr(sdv2_lab.build, "build_pipeline", no_build)
    args = dict(height=H, width=W, device="cpu")
    with pytest.raises(ValueError, match=match):
        StreamDiffusionV2Pipeline(CKPT, **{**args, **kwargs})


def test_run_video_to_video_checks_the_output_path_first(in_root, monkeypatch):
    import sdv2_lab.build
    from sdv2_lab import run_video_to_video
    monkeypatch.setattr(sdv2_lab.build, "build_pipeline", lambda cfg: pytest.fail("built before the check"))
    (in_root / "outputs").mkdir(exist_ok=True)
    with pytest.raises(IsADirectoryError, match="is an existing folder"):
        run_video_to_video(checkpoint_folder=CKPT, video_path="examples/original.mp4", prompt="p",
                           output_path="outputs", height=H, width=W, device="cpu")
    write_synthetic_clip("short.mp4", frames=3, height=H, width=W)
    with pytest.raises(ValueError, match=r"short\.mp4 has 3 frame\(s\); the first chunk needs 5"):
        run_video_to_video(checkpoint_folder=CKPT, video_path="short.mp4", prompt="p", output_path="o.mp4",
                           height=H, width=W, device="cpu")
    assert not list(in_root.rglob("*.tmp*"))


def test_run_video_to_video_writes_every_frame(in_root):
    from sdv2_lab import run_video_to_video
    out = run_video_to_video(checkpoint_folder=CKPT, video_path="examples/original.mp4", prompt="a dog",
                             output_path="outputs/v2v.mp4", height=H, width=W, device="cpu", step=2)
    assert frames_of(out) == FRAMES


def test_the_readme_shows_the_seeds_usage_on_a_cpu_and_it_runs(tmp_path):
    """The README's CPU example (tiny checkpoint, the seed's loop, enable_acceleration, flush), run as written
    (only the interpreter's path is this test's), and its documentation of overrides=."""
    import subprocess
    import sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The seed's Python API"):readme.index("## Real weights")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "from sdv2_lab import StreamDiffusionV2Pipeline" in block and "python -m sdv2_lab.tiny_checkpoint" in block
    script = re.sub(r"(\.\./)?\.venv/bin/python", sys.executable, block)
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert frames_of(tmp_path / "tiny" / "outputs" / "python_single.mp4") == 9
    assert "overrides=[" in section and "applied after the seed's arguments" in section
