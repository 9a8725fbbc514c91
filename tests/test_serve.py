"""`sdv2 serve` through its real ASGI server (uvicorn in a thread, a free loopback port) and WebSocket clients, on
the tiny model on the CPU: frames in, restyled frames out, prompt change mid-stream, every malformed input,
busy, disconnect, the controls, MJPEG out. The browser test is test_serve_browser.py, the load test
test_serve_load.py."""
from __future__ import annotations

import functools
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
websockets_sync = pytest.importorskip("websockets.sync.client")

from sdv2_lab.build import compose_config  # noqa: E402
from sdv2_lab.serve import protocol, wire  # noqa: E402
from sdv2_lab.serve.background import serve_in_thread  # noqa: E402
from sdv2_lab.serve.client import synthetic_jpegs  # noqa: E402
from sdv2_lab.serve.engine import Engine, engine_config  # noqa: E402
from sdv2_lab.serve.settings import ServeSettings  # noqa: E402

H, W = 32, 48
OVERRIDES = [f"height={H}", f"width={W}"]


@functools.cache
def tiny_engine() -> Engine:
    """One engine for every serve test of this process (the hub's settings differ per test, not the model)."""
    cfg = compose_config("serve", OVERRIDES)
    return Engine(cfg, ServeSettings.from_config(cfg.serve))


def settings(**kw) -> ServeSettings:
    base = dict(port=0, max_streams=4, input_fps=1000.0, inbox_frames=64, warmup=False, log_level="warning")
    base.update(kw)
    return ServeSettings(**base).validate()


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


FRAMES = synthetic_jpegs(24, H, W)


def ws_connect(base: str):
    return websockets_sync.connect(base.replace("http://", "ws://") + "/ws", max_size=None, open_timeout=30).__enter__()


class Client:
    """A blocking WebSocket client: control replies in ``messages``, output frames in ``frames``."""

    def __init__(self, base: str):
        self.base = base
        self.ws = ws_connect(base)
        self.messages: list[dict] = []
        self.frames: list[tuple[wire.Tag, int, bytes]] = []
        self.hello = self.wait_for("hello")
        self.seq = 0

    def send(self, msg) -> None:
        self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    def _take(self, timeout: float) -> bool:
        try:
            m = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return False
        if isinstance(m, bytes):
            tag, index, _, jpeg = wire.unpack_output(m)
            self.frames.append((tag, index, jpeg))
        else:
            self.messages.append(json.loads(m))
        return True

    def wait_for(self, kind: str, timeout: float = 60.0, **match) -> dict:
        """The next message of that type (and field values) after those already seen."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for m in self.messages[seen:]:
                if m["type"] == kind and all(m.get(k) == v for k, v in match.items()):
                    self.messages.remove(m)
                    return m
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} {match or ''} within {timeout} s; got {self.messages[-5:]}")
            self._take(min(left, 0.5))

    def error(self, code: str, timeout: float = 30.0) -> dict:
        return self.wait_for("error", timeout, code=code)

    def start(self, **opts) -> dict:
        self.send({"type": "start", "prompt": "a watercolor painting", **opts})
        return self.wait_for("started", 120)

    def send_frame(self, jpeg: bytes) -> None:
        self.send(wire.pack_input(jpeg, self.seq, 1e3 * time.perf_counter()))
        self.seq += 1

    def wait_frames(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.frames)} of {n} output frames within {timeout} s")
            self._take(0.5)

    def close(self) -> None:
        self.ws.close()


def stream_info(base: str, session: int) -> dict:
    for s in httpx.get(base + "/api/metrics").json()["streams"]:
        if s["id"] == session:
            return s
    raise AssertionError(f"session {session} is not in /api/metrics")


def feed_chunk(c: Client, session: int, frames: list[bytes], timeout: float = 60.0) -> None:
    """Send one chunk's frames and wait until the model has taken them (lockstep: nothing is dropped)."""
    before = stream_info(c.base, session)["frames_fed"]
    for f in frames:
        c.send_frame(f)
    deadline = time.monotonic() + timeout
    while stream_info(c.base, session)["frames_fed"] < before + len(frames):
        assert time.monotonic() < deadline, "the model did not take the chunk"
        c._take(0.02)


def chunks(first: int = 5, size: int = 4, count: int = 6) -> list[list[bytes]]:
    out, k = [], 0
    for i in range(count):
        n = first if i == 0 else size
        out.append([FRAMES[(k + j) % len(FRAMES)] for j in range(n)])
        k += n
    return out


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def wait_health(base: str, key: str, value, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while httpx.get(base + "/api/health").json()[key] != value:
        assert time.monotonic() - t0 < timeout, f"/api/health {key} never became {value}"
        time.sleep(0.02)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- no server
def test_wire_jpeg_tags_and_bad_frames():
    img = (np.arange(H * W * 3) % 251).reshape(H, W, 3).astype(np.uint8)
    jpeg = wire.encode_jpeg(img, 90)
    frame, resized = wire.decode_jpeg(jpeg, H, W, resize=False, max_pixels=10 ** 6)
    assert frame.shape == (H, W, 3) and frame.dtype == np.uint8 and not resized
    tag, body = wire.split_tag(wire.pack_input(jpeg, 7, 123.5), 0)
    assert (tag.seq, tag.client_ms, body) == (7, 123.5, jpeg)
    assert wire.split_tag(jpeg, 3)[0].seq == 3                                  # untagged: the server's count
    t, index, ms, body = wire.unpack_output(wire.pack_output(jpeg, wire.Tag(9, 1.25), 4, 2.5))
    assert (t.seq, t.client_ms, index, ms, body) == (9, 1.25, 4, 2.5, jpeg)

    big = wire.encode_jpeg(np.zeros((120, 160, 3), np.uint8), 80)               # 4:3 -> centre crop to 3:2
    frame, resized = wire.decode_jpeg(big, H, W, resize=True, max_pixels=10 ** 6)
    assert frame.shape == (H, W, 3) and resized
    with pytest.raises(wire.FrameError, match="takes 48x32 exactly") as e:
        wire.decode_jpeg(big, H, W, resize=False, max_pixels=10 ** 6)
    assert e.value.code == "bad_size"
    with pytest.raises(wire.FrameError, match="max_frame_pixels"):
        wire.decode_jpeg(big, H, W, resize=True, max_pixels=1000)
    for bad in (b"", b"not a jpeg", jpeg[:40], b"\xff\xd8" + b"\x00" * 100):
        with pytest.raises(wire.FrameError) as e:
            wire.decode_jpeg(bad, H, W, resize=True, max_pixels=10 ** 6)
        assert e.value.code == "bad_image"


def test_protocol_and_settings_errors():
    for text, code in (("{", "bad_json"), ("[1, 2]", "bad_json"), ('{"type": "jump"}', "unknown_control"),
                       ('{"no": "type"}', "unknown_control")):
        with pytest.raises(protocol.ProtocolError) as e:
            protocol.parse(text)
        assert e.value.code == code
    with pytest.raises(protocol.ProtocolError, match="steps must be an integer from 1 to 4"):
        protocol.start_options({"steps": 5}, default_prompt="p", default_steps=2, default_noise=0.8, max_steps=4)
    with pytest.raises(protocol.ProtocolError, match="noise_scale"):
        protocol.noise_scale_of(0)
    with pytest.raises(ValueError, match="serve.max_streams must be a positive integer"):
        ServeSettings(max_streams=0).validate()
    with pytest.raises(ValueError, match="unknown key"):
        ServeSettings.from_config({"prot": 1})
    cfg = compose_config("serve", [])
    s = ServeSettings.from_config(cfg.serve)
    assert (s.host, s.port, s.input_fps) == ("127.0.0.1", 7860, 16)       # loopback, the reference's port
    c = engine_config(cfg, s)
    assert s.max_steps is None and (c.streams, c.steps) == (s.max_streams, 4) and cfg.steps == 2   # null: 4 here
    with pytest.raises(ValueError, match="within 1..serve.max_steps=1"):
        engine_config(cfg, ServeSettings(max_steps=1))
    with pytest.raises(ValueError, match=r"serve.max_steps=5 but this backbone's recipe allows 1..4 steps"):
        engine_config(cfg, ServeSettings(max_steps=5))      # a stream batch holds one slot per step, 4 at most
    with pytest.raises(ValueError, match="serve.max_steps must be null"):
        ServeSettings(max_steps=0).validate()
    rolling = compose_config("serve", ["backbone=rolling_forcing"])
    assert rolling.steps == 5 and engine_config(rolling, s).steps == 5     # the rolling window: one block per step
    assert engine_config(compose_config("serve", ["backbone=self_forcing"]), s).steps == 4


# ---------------------------------------------------------------------------------------------- one client
def test_frames_in_restyled_frames_out_and_prompt_change(engine):
    """Lockstep: the same seed and frames give the same output; a prompt change applies mid-stream (no
    restart) and changes every chunk computed after it, not those before. (With dummy weights a prompt moves
    the pixels only slightly, so the chunks are compared as the model made them, from the driver's
    ``ChunkOut`` events, as well as on the wire.)"""
    from sdv2_lab.stream.timing import ChunkOut

    def run(change_prompt: bool):
        made: list = []
        listener = engine.driver.subscribe(
            lambda e: made.append(e.frames.float().cpu().clone()) if isinstance(e, ChunkOut) else None)
        try:
            with serve_in_thread(engine, settings()) as base:
                c = Client(base)
                assert c.hello["weights_dummy"] is True and (c.hello["height"], c.hello["width"]) == (H, W)
                started = c.start(seed=3, steps=2)
                assert started["weights"] == "dummy" and started["steps"] == 2
                session, stream = started["session"], started["stream"]
                parts = chunks(count=6)
                for part in parts[:3]:
                    feed_chunk(c, session, part)
                c.wait_frames(5 + 4)                           # chunk 1 at once, then one chunk behind (2 steps)
                if change_prompt:
                    c.send({"type": "prompt", "prompt": "a charcoal sketch"})
                    assert c.wait_for("ack", control="prompt")["prompt"] == "a charcoal sketch"
                    info = stream_info(base, session)
                    assert info["prompt"] == "a charcoal sketch" and info["stream"] == stream   # same stream
                for part in parts[3:]:
                    feed_chunk(c, session, part)
                c.wait_frames(5 + 4 * 4)
                info = stream_info(base, session)
                assert info["frames_fed"] == 5 + 4 * 5 and info["dropped_total"] == 0 and info["errors"] == 0
                assert info["latency_p50_ms"] is not None and info["frames_out"] == 5 + 4 * 4
                c.close()
                wait_health(base, "streams", 0)
        finally:
            engine.driver.unsubscribe(listener)
        return made, c.frames

    made_a, frames_a = run(change_prompt=False)
    made_b, frames_b = run(change_prompt=True)
    assert [m.shape[0] for m in made_a] == [m.shape[0] for m in made_b] == [5, 4, 4, 4, 4]
    assert all(torch.equal(x, y) for x, y in zip(made_a[:2], made_b[:2])), "chunks made before the change changed"
    for k, (x, y) in enumerate(zip(made_a[2:], made_b[2:]), start=3):
        assert not torch.equal(x, y), f"chunk {k}, made after the prompt change, did not change"
    assert not torch.allclose(torch.cat(made_a[2:]), torch.cat(made_b[2:]))
    seqs = [t.seq for t, _, _ in frames_a]
    assert seqs == list(range(len(seqs))) and [i for _, i, _ in frames_a] == seqs   # each output echoes its input
    a = np.stack([decoded(j) for _, _, j in frames_a])
    b = np.stack([decoded(j) for _, _, j in frames_b])
    assert a.shape == (21, H, W, 3)
    assert np.array_equal(a[:9], b[:9])
    assert len({j for _, _, j in frames_a}) > len(frames_a) // 2, "the output frames must change over time"


# ---------------------------------------------------------------------------------------------- bad input
def test_malformed_input_gets_errors_and_the_others_keep_their_state(engine):
    with serve_in_thread(engine, settings(input_fps=16.0, inbox_frames=12, max_message_bytes=50_000)) as base:
        good = Client(base)
        g = good.start(seed=1)
        stop = threading.Event()

        def stream_good():
            k = 0
            while not stop.is_set():
                good.send_frame(FRAMES[k % len(FRAMES)])
                k += 1
                while good._take(0.0):
                    pass
                time.sleep(1 / 16)

        t = threading.Thread(target=stream_good, daemon=True)
        t.start()
        bad = Client(base)
        # before the stream started: a frame, a control
        bad.send_frame(FRAMES[0])
        assert "before the stream started" in bad.error("not_started")["message"]
        bad.send({"type": "prompt", "prompt": "x"})
        bad.error("not_started")
        # not JSON, not an object, unknown control, bad values
        bad.send("{nope")
        bad.error("bad_json")
        bad.send("[1, 2]")
        bad.error("bad_json")
        bad.send({"type": "explode"})
        assert "known: start, prompt" in bad.error("unknown_control")["message"]
        bad.send({"type": "start", "steps": 9})
        bad.error("bad_value")
        bad.send({"type": "start", "noise_scale": "loud"})
        bad.error("bad_value")
        bad.send({"type": "start", "prompt": "   "})
        bad.error("bad_value")
        bad_session = bad.start()["session"]
        bad.send({"type": "start"})
        bad.error("bad_state")
        # frames that do not decode, an oversized message, a frame of another size (resized, said once)
        bad.send(b"GIF89a not a jpeg")
        assert "not a JPEG" in bad.error("bad_image")["message"]
        bad.send(wire.pack_input(FRAMES[0][:60], 0, 0.0))
        assert "does not decode" in bad.error("bad_image")["message"]
        bad.send(b"\xff\xd8" + b"\x00" * 60_000)
        assert "over serve.max_message_bytes=50000" in bad.error("oversize")["message"]
        bad.send("x" * 60_001)
        bad.error("oversize")
        time.sleep(0.2)       # let the throttle refill
        bad.send_frame(wire.encode_jpeg(np.full((120, 160, 3), 90, np.uint8), 80))
        assert "resized to 48x32" in bad.wait_for("info")["message"]
        bad.send({"type": "steps", "value": 0})
        bad.error("bad_value")
        bad.send({"type": "taehv", "on": "yes"})
        bad.error("bad_value")
        bad.send({"type": "prompt", "prompt": "p" * 5000})
        bad.error("bad_value")
        assert stream_info(base, bad_session)["errors"] >= 7       # those after its start (the socket stayed open)
        # the other client never noticed: same stream, frames still coming, no errors
        n = len(good.frames)
        deadline = time.monotonic() + 60
        while len(good.frames) < n + 4:
            assert time.monotonic() < deadline, "the good client stopped getting frames"
            time.sleep(0.1)
        stop.set()
        t.join()
        info = stream_info(base, g["session"])
        assert info["stream"] == g["stream"] and info["errors"] == 0 and info["frames_out"] > 0
        assert not [m for m in good.messages if m["type"] == "error"]
        bad.close()
        good.close()


# ---------------------------------------------------------------------------------------------- capacity
def test_busy_reply_and_disconnect_frees_the_stream_at_once(engine):
    with serve_in_thread(engine, settings(max_streams=2)) as base:
        a, b, c = Client(base), Client(base), Client(base)
        a.start()
        b.start()
        c.send({"type": "start"})
        busy = c.wait_for("busy")
        assert "max_streams=2" in busy["message"] and busy["max_streams"] == 2
        c.send_frame(FRAMES[0])                       # still not started: told so, the socket stays open
        c.error("not_started")
        assert httpx.get(base + "/api/health").json()["streams"] == 2
        a.close()                                     # a disconnect, no stop message
        freed = wait_health(base, "streams", 1)
        assert freed < 5.0, f"the stream was freed {freed:.1f} s after the disconnect"
        started = c.start()
        assert started["session"] == 2
        # the engine's own limit agrees: its KV rows came back
        assert tiny_engine().driver.scheduler.streams.keys().__len__() == 2
        b.close()
        c.close()
        wait_health(base, "streams", 0)
        assert httpx.get(base + "/api/metrics").json()["totals"]["busy_replies"] == 1


def test_connection_limit(engine):
    with serve_in_thread(engine, settings(max_connections=1)) as base:
        a = Client(base)
        ws = ws_connect(base)
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "busy" and "max_connections" in msg["message"]
        ws.close()
        a.close()


# ---------------------------------------------------------------------------------------------- controls
def test_controls_noise_steps_taehv_pause_stop(engine):
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        s = c.start(steps=2, noise_scale=0.7)
        session, stream = s["session"], s["stream"]
        parts = chunks(count=8)
        for part in parts[:2]:
            feed_chunk(c, session, part)
        c.wait_frames(5)
        c.send({"type": "noise_scale", "value": 0.5})
        assert c.wait_for("ack", control="noise_scale")["noise_scale"] == 0.5
        info = stream_info(base, session)
        assert info["noise_scale"] == 0.5 and info["stream"] == stream          # no restart
        ctl = engine.driver.scheduler.streams[stream].dev.controller
        assert float(ctl.s0) == 0.5
        c.send({"type": "steps", "value": 1})
        ack = c.wait_for("ack", control="steps")
        assert ack["restarted"] and ack["stream"] != stream
        assert len(engine.driver.scheduler.streams[ack["stream"]].steps) == 1
        n = len(c.frames)
        feed_chunk(c, session, parts[0])                # a new stream: a first chunk again
        c.wait_frames(n + 5)                            # 1 step: every chunk comes out at once
        c.send({"type": "taehv", "on": True})
        ack = c.wait_for("ack", control="taehv", timeout=120)
        assert ack["restarted"] and stream_info(base, session)["taehv"] is True
        assert type(engine.driver.scheduler.streams[ack["stream"]].dev.vae).__name__ == "TAEHVVAE"
        n = len(c.frames)
        feed_chunk(c, session, parts[0])
        c.wait_frames(n + 5)
        c.send({"type": "pause"})
        assert c.wait_for("ack", control="pause")["state"] == "paused"
        fed = stream_info(base, session)["frames_fed"]
        for f in parts[1]:
            c.send_frame(f)
        time.sleep(0.5)
        assert stream_info(base, session)["frames_fed"] == fed              # paused: frames are not used
        c.send({"type": "resume"})
        assert c.wait_for("ack", control="resume")["state"] == "running"
        feed_chunk(c, session, parts[1])
        c.send({"type": "stop"})
        c.wait_for("stopped")
        assert httpx.get(base + "/api/health").json()["streams"] == 0
        c.send_frame(FRAMES[0])
        c.error("not_started")
        c.start()                                        # the same socket can start again
        c.close()


def test_serve_starts_on_the_rolling_window_with_its_five_steps():
    """Rolling Forcing's recipe has 5 steps (one block of the window per step): the server offers 1..5 (the
    stream batch's cap of 4 is not its), a client streams at 5, and 6 is refused."""
    cfg = compose_config("serve", OVERRIDES + ["backbone=rolling_forcing", "backbone.dim=256", "backbone.ffn_dim=512",
                                               "backbone.num_heads=2", "backbone.num_layers=2"])
    eng = Engine(cfg, ServeSettings.from_config(cfg.serve))
    with serve_in_thread(eng, settings()) as base:
        c = Client(base)
        assert (c.hello["model"], c.hello["default_steps"], c.hello["max_steps"]) == ("rolling_forcing", 5, 5)
        s = c.start(steps=5)
        assert len(eng.driver.scheduler.streams[s["stream"]].steps) == 5
        for part in chunks(first=eng.first_chunk, size=eng.chunk, count=6):
            feed_chunk(c, s["session"], part)
        c.wait_frames(eng.first_chunk + eng.chunk, timeout=120)   # each block leaves the window 4 blocks later
        c.send({"type": "steps", "value": 6})
        assert "from 1 to 5" in c.error("bad_value")["message"]
        c.close()
    eng.shutdown()


def test_mjpeg_output(engine):
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        s = c.start(output="mjpeg")
        assert s["mjpeg"].endswith(".mjpg")
        assert httpx.get(base + "/api/stream/wrong.mjpg").status_code == 404
        parts: list[bytes] = []

        def read():
            with httpx.stream("GET", base + s["mjpeg"], timeout=60) as r:
                assert r.headers["content-type"].startswith("multipart/x-mixed-replace")
                buf = b""
                for chunk in r.iter_bytes():
                    buf += chunk
                    while b"\r\n\r\n" in buf and len(parts) < 2:
                        head, _, rest = buf.partition(b"\r\n\r\n")
                        size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                        if len(rest) < size + 2:
                            break
                        parts.append(rest[:size])
                        buf = rest[size + 2:]
                    if len(parts) >= 2:
                        return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(0.3)
        for part in chunks(count=3):
            feed_chunk(c, s["session"], part)
        t.join(timeout=60)
        assert len(parts) == 2 and all(decoded(p).shape == (H, W, 3) for p in parts)
        assert not c.frames                                  # MJPEG out: no frames on the socket
        assert stream_info(base, s["session"])["frames_out"] >= 2
        c.close()


def test_a_frame_of_another_size_is_refused_when_resize_is_off(engine):
    with serve_in_thread(engine, settings(resize=False)) as base:
        c = Client(base)
        s = c.start()
        c.send_frame(wire.encode_jpeg(np.zeros((120, 160, 3), np.uint8), 80))
        assert "160x120 but this server takes 48x32 exactly" in c.error("bad_size")["message"]
        feed_chunk(c, s["session"], chunks()[0])          # frames of the right size still go through
        c.wait_frames(5)
        c.close()


def test_a_failed_model_step_restarts_that_stream_and_the_server_goes_on(engine, monkeypatch):
    real, calls = engine.tick, {"n": 0}

    def flaky(work):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return real(work)

    monkeypatch.setattr(engine, "tick", flaky)
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        s = c.start()
        parts = chunks()
        feed_chunk(c, s["session"], parts[0])
        c.wait_frames(5)
        for f in parts[1]:
            c.send_frame(f)
        assert "simulated device error" in c.error("engine")["message"]
        deadline = time.monotonic() + 30
        while stream_info(base, s["session"])["stream"] == s["stream"]:
            assert time.monotonic() < deadline, "the stream was not restarted"
            time.sleep(0.05)
        assert len(engine.driver.scheduler.streams) == 1        # the old stream's rows were freed
        feed_chunk(c, s["session"], parts[0])                   # a first chunk again, served
        c.wait_frames(10)
        c.close()


def test_websockets_from_other_origins_are_refused(engine):
    with serve_in_thread(engine, settings()) as base:
        url = base.replace("http://", "ws://") + "/ws"
        with pytest.raises(Exception, match="403"):
            websockets_sync.connect(url, origin="http://evil.example", open_timeout=10).__enter__()
        ws = websockets_sync.connect(url, origin=base, open_timeout=10).__enter__()   # the server's own page
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.close()
    with serve_in_thread(engine, settings(allowed_origins=["http://evil.example"])) as base:
        ws = websockets_sync.connect(base.replace("http://", "ws://") + "/ws", origin="http://evil.example",
                                     open_timeout=10).__enter__()
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.close()
