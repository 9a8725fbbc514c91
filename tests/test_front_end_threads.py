"""`sdv2 run` / run_v2v.sh keep file work off the thread that feeds the GPU (issue 17): the video is decoded on a
thread ahead of use, the mp4 is encoded on a thread behind it, frames reach the host as uint8 made on the device;
the output is the synchronous writer's, frame for frame and byte for byte."""
import threading
import time

import numpy as np
import pytest
import torch

from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.io.synthetic import write_synthetic_clip
from sdv2_lab.io.threads import BackgroundWriter, prefetch
from sdv2_lab.io.video import VideoWriter, _to_uint8, frames_to_uint8, iter_video_frames, load_video
from sdv2_lab.stream.clips import stream_clip

H, W = 32, 48


def decoded(path) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_sdv2_run_writes_the_synchronous_writers_frames(tmp_path):
    from sdv2_lab.cli import run
    write_synthetic_clip(tmp_path / "in.mp4", frames=21, height=H, width=W)
    ov = ["device=cpu", f"height={H}", f"width={W}", "input=file", f"input.video={tmp_path / 'in.mp4'}",
          "input.prompt=a watercolor", f"output.dir={tmp_path / 'run'}", "steps=2"]
    stats = run(compose_config("config", ov))
    assert stats["output_frames"] == 21 and stats["writer_waits"] == 0
    # the same stream, written synchronously from float frames on the main thread
    cfg = compose_config("config", ov)
    pipe = build_pipeline(cfg)
    frames, _ = stream_clip(pipe, iter_video_frames(tmp_path / "in.mp4", height=H, width=W, batch=4), "a watercolor")
    with VideoWriter(tmp_path / "sync.mp4", fps=cfg.fps) as w:
        w.write(frames)
    threaded, sync = decoded(tmp_path / "run" / "output.mp4"), decoded(tmp_path / "sync.mp4")
    assert threaded.shape == sync.shape == (21, H, W, 3)
    np.testing.assert_array_equal(threaded, sync)
    assert (tmp_path / "run" / "output.mp4").read_bytes() == (tmp_path / "sync.mp4").read_bytes()


def test_uint8_on_the_device_is_the_writers_rounding():
    x = torch.rand(3, 8, 8, 3) * 1.2 - 0.1          # some values outside [0, 1] too
    x[0, 0, 0] = torch.tensor([0.5 / 255, 254.5 / 255, 1.0])   # halfway cases
    expected = (np.clip(x.numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)   # the writer's numpy rounding
    np.testing.assert_array_equal(frames_to_uint8(x).numpy(), expected)
    np.testing.assert_array_equal(_to_uint8(x.numpy()), expected)


def test_prefetch_reads_ahead_in_order_and_raises_where_it_is_used():
    seen = []

    def source():
        for i in range(20):
            seen.append(i)
            yield i
    it = prefetch(source(), depth=4)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(seen) > 1                               # read ahead of use ...
    assert len(seen) <= 1 + 4 + 1                      # ... but never more than `depth` ahead
    assert list(it) == list(range(1, 20))

    def broken():
        yield 1
        raise ValueError("cannot decode video x.mp4 after 1 frames")
    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="x.mp4 after 1 frames"):
        next(it)


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            i += 1
            yield i
    before = threading.active_count()
    it = prefetch(endless(), depth=2)
    next(it)
    it.close()
    assert threading.active_count() == before


class SlowWriter:
    path = "slow.mp4"

    def __init__(self, fail_at=None):
        self.frames, self.gate, self.fail_at, self.closed, self.aborted = [], threading.Event(), fail_at, False, False
        self.entered = threading.Event()

    def write(self, frames):
        self.entered.set()
        self.gate.wait()
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise OSError("No space left on device")
        self.frames.append(frames)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def test_background_writer_never_blocks_until_its_queue_is_full():
    w = SlowWriter()
    bw = BackgroundWriter(w, depth=3)
    bw.write([0])
    assert w.entered.wait(10)                           # the writer thread holds it (and is stuck in write)
    for i in range(1, 4):                               # three queued behind it
        bw.write([i])
    assert bw.waits == 0 and w.frames == []
    threading.Timer(0.2, w.gate.set).start()
    bw.write([4])                                       # full: this one waits for the writer
    assert bw.waits == 1
    bw.close()
    assert w.frames == [[0], [1], [2], [3], [4]] and w.closed and bw.written == 5


def test_background_writer_failure_is_raised_and_the_file_dropped():
    w = SlowWriter(fail_at=1)
    w.gate.set()
    bw = BackgroundWriter(w)
    bw.write([0])
    bw.write([1])
    with pytest.raises(RuntimeError, match="writing slow.mp4 failed: OSError: No space left"):
        bw.close()
    assert w.aborted and not w.closed


def test_the_threaded_reader_gives_the_files_frames(tmp_path):
    write_synthetic_clip(tmp_path / "in.mp4", frames=13, height=H, width=W)
    pieces = list(prefetch(iter_video_frames(tmp_path / "in.mp4", height=H, width=W, batch=4)))
    assert [p.shape[1] for p in pieces] == [4, 4, 4, 1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), load_video(tmp_path / "in.mp4", height=H, width=W),
                               rtol=0, atol=0)


def test_chunks_spread_over_pieces_are_joined_on_the_encode_lane(tmp_path):
    """A file's pieces of 4 frames do not line up with chunks (5, then 4): the join of two pieces must run on the
    encode lane, where their host->device copies were queued (on the GPU, a join on another CUDA stream read
    frames still being copied: NaN in `sdv2 run`'s chunk 3)."""
    pipe = build_pipeline(compose_config("config", ["device=cpu", f"height={H}", f"width={W}", "steps=1"]))
    driver = pipe.driver
    joins, take = [], driver.scheduler.next_chunk

    def next_chunk(stream):   # where a chunk's frames are cut from the buffered pieces (joined when spread)
        joined = stream.buffer and stream.buffer[0].shape[1] < driver.scheduler.frames_needed(stream)
        c = take(stream)
        if c is not None and c.frames is not None and joined:
            joins.append(driver.lanes.active)
        return c

    driver.scheduler.next_chunk = next_chunk
    frames, _ = stream_clip(pipe, iter([torch.rand(3, 4, H, W) * 2 - 1 for _ in range(4)]), "a watercolor")
    assert frames.shape[0] == 13 and torch.isfinite(frames).all()
    assert joins and set(joins) == {"encode"}, joins
