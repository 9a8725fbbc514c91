"""`sdv2 serve` under faults and misuse: a client that floods controls and leaves frees its stream at once (its
waiting controls coalesced, then dropped), /api/health counts what the engine holds, a DNS-rebinding pair is
refused, TLS, a half-open request times out, huge JPEG headers and seeds get errors naming them, TAEHV with
dummy weights is visible noise, the SLO numbers (/api/metrics, Prometheus /metrics), Ctrl+C exits cleanly."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
websockets_sync = pytest.importorskip("websockets.sync.client")

from test_serve import FRAMES, Client, chunks, feed_chunk, settings, stream_info, tiny_engine, wait_health  # noqa: E402

from sdv2_lab.serve import wire  # noqa: E402
from sdv2_lab.serve.background import serve_in_thread  # noqa: E402
from sdv2_lab.serve.hub import Hub  # noqa: E402
from sdv2_lab.serve.settings import ServeSettings  # noqa: E402
from interrupts import sigint_as_a_terminal_sends_it  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/install installs it")
        pytest.skip(why)


# ---------------------------------------------------------------------------------------------- controls
def test_a_client_that_floods_controls_and_leaves_frees_its_stream_at_once(engine, monkeypatch):
    """300 prompt and 60 steps messages, then the socket closes: the waiting ones are coalesced (latest prompt,
    latest steps) and dropped at the disconnect; no control starts after it, so the stream is freed after at most
    the one running then (each control is one engine call: ~1 s at the most at real sizes)."""
    calls: list[tuple[str, float]] = []
    real_prompt, real_reopen = engine.set_prompt, engine.reopen

    def slow_prompt(s, p):
        calls.append(("prompt", time.monotonic()))
        time.sleep(0.05)                  # a text encoder's time: 300 of them would hold the stream 15 s
        return real_prompt(s, p)

    def counted_reopen(*a):
        calls.append(("reopen", time.monotonic()))
        return real_reopen(*a)

    left: list[float] = []
    real_disconnect = Hub.disconnect

    async def timed_disconnect(self, s):
        left.append(time.monotonic())
        return await real_disconnect(self, s)

    monkeypatch.setattr(engine, "set_prompt", slow_prompt)
    monkeypatch.setattr(engine, "reopen", counted_reopen)
    monkeypatch.setattr(Hub, "disconnect", timed_disconnect)
    with serve_in_thread(engine, settings(max_streams=1)) as base:
        c = Client(base)
        c.start(steps=2)
        assert httpx.get(base + "/api/health").json()["streams"] == 1
        for k in range(300):
            c.send({"type": "prompt", "prompt": f"prompt {k}"})
            if k % 5 == 0:
                c.send({"type": "steps", "value": 1 + (k // 5) % 2})
        c.close()
        freed = wait_health(base, "streams", 0)
        assert httpx.get(base + "/api/health").json()["engine_streams"] == 0
        assert not engine.driver.scheduler.streams
        totals = httpx.get(base + "/api/metrics").json()["totals"]
        other = Client(base)                                   # the one stream is free for the next client
        assert other.start()["type"] == "started"
        other.close()
        wait_health(base, "streams", 0)
    prompts = [t for k, t in calls if k == "prompt"]
    reopens = [t for k, t in calls if k == "reopen"]
    assert left and len(prompts) <= 4 and len(reopens) <= 4, (len(prompts), len(reopens))   # not 300 and 60
    assert not [t for _, t in calls if t > left[0]], "a control started after the client left"
    assert totals["controls_superseded"] >= 300 + 60 - len(prompts) - len(reopens) - 2
    print(f"\nstream freed {freed:.2f} s after the disconnect; {len(prompts)} prompt and {len(reopens)} steps "
          f"control(s) ran of 360")


def test_controls_coalesce_latest_wins_and_say_so(engine):
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        s = c.start()
        for k in range(40):
            c.send({"type": "prompt", "prompt": f"prompt {k}"})
        ack = c.wait_for("ack", control="prompt", prompt="prompt 39")
        acks = [ack] + [m for m in c.messages if m["type"] == "ack" and m["control"] == "prompt"]
        assert sum(1 + a.get("superseded", 0) for a in acks) == 40           # every message accounted for
        assert stream_info(base, s["session"])["prompt"] == "prompt 39"
        c.close()


def test_health_counts_what_the_engine_holds(engine, monkeypatch):
    """While a closing client's stream is still held by the engine, /api/health does not offer it as free."""
    gate, entered = threading.Event(), threading.Event()
    real_close = engine.close

    def held_close(s):
        entered.set()
        gate.wait(30)
        return real_close(s)

    monkeypatch.setattr(engine, "close", held_close)
    with serve_in_thread(engine, settings(max_streams=1)) as base:
        c = Client(base)
        c.start()
        c.close()
        assert entered.wait(30)
        h = httpx.get(base + "/api/health").json()
        assert h["streams"] == 1 and h["engine_streams"] == 1           # not yet free: the engine holds it
        gate.set()
        wait_health(base, "streams", 0)


# ---------------------------------------------------------------------------------------------- hosts, TLS, timeouts
def test_a_dns_rebinding_pair_is_refused(engine):
    """A page of evil.example whose name now resolves to this machine sends Origin and Host of evil.example:
    they agree with each other, but the Host is not this server."""
    with serve_in_thread(engine, settings()) as base:
        port = int(base.rsplit(":", 1)[1])
        evil = f"evil.example:{port}"
        r = httpx.get(base + "/api/health", headers={"Host": evil})
        assert r.status_code == 400 and "not this server" in r.text and "serve.allowed_hosts" in r.text
        sock = socket.create_connection(("127.0.0.1", port))
        with pytest.raises(Exception, match="403"):
            websockets_sync.connect(f"ws://{evil}/ws", sock=sock, origin=f"http://{evil}", open_timeout=10).__enter__()
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):              # the server's own names
            assert httpx.get(base + "/api/health", headers={"Host": host}).status_code == 200
        ws = websockets_sync.connect(f"ws://localhost:{port}/ws", sock=socket.create_connection(("127.0.0.1", port)),
                                     origin=f"http://localhost:{port}", open_timeout=10).__enter__()
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.close()
    with serve_in_thread(engine, settings(allowed_hosts=["studio.example"])) as base:
        port = int(base.rsplit(":", 1)[1])
        assert httpx.get(base + "/api/health", headers={"Host": f"studio.example:{port}"}).status_code == 200
        assert httpx.get(base + "/api/health", headers={"Host": f"evil.example:{port}"}).status_code == 400


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    _need(shutil.which("openssl") is not None, "openssl is not on PATH (it makes the test's certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_serves_https_and_wss(engine, tmp_path):
    cert, key = self_signed(tmp_path)
    with serve_in_thread(engine, settings(ssl_certfile=str(cert), ssl_keyfile=str(key))) as base:
        assert base.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(base + "/api/health", verify=trust).json()["status"] == "ok"
        ws = websockets_sync.connect(base.replace("https://", "wss://") + "/ws", ssl=trust, open_timeout=10).__enter__()
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.close()
        with pytest.raises(httpx.HTTPError):
            httpx.get(base.replace("https://", "http://") + "/api/health", timeout=10)
    with pytest.raises(ValueError, match="serve.ssl_keyfile needs serve.ssl_certfile"):
        ServeSettings(ssl_keyfile=str(key)).validate()
    with pytest.raises(ValueError, match="serve.ssl_certfile='/no/cert.pem': no such file"):
        ServeSettings(ssl_certfile="/no/cert.pem").validate()


def test_the_non_localhost_warning_names_tls_and_hosts(tmp_path):
    exposed = ServeSettings(host="0.0.0.0").validate().exposure_warning()
    assert "anyone who can reach this machine" in exposed and "serve.ssl_certfile" in exposed
    assert "serve.allowed_hosts" in exposed
    cert, key = self_signed(tmp_path)
    secured = ServeSettings(host="0.0.0.0", ssl_certfile=str(cert), ssl_keyfile=str(key),
                            allowed_hosts=["studio.example"]).validate().exposure_warning()
    assert "ssl_certfile" not in secured and "allowed_hosts" not in secured
    assert ServeSettings().validate().exposure_warning() is None


def test_a_half_open_request_is_timed_out(engine):
    with serve_in_thread(engine, settings(header_timeout_s=0.3)) as base:
        port = int(base.rsplit(":", 1)[1])
        for keep_alive_first in (False, True):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(30)                 # far beyond the header timeout: a hang fails the test
                if keep_alive_first:                # a whole request first, then a half one on the same connection
                    sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                got = b""
                while True:
                    part = sock.recv(4096)
                    if not part:
                        break
                    got += part
                assert b"HTTP/1.1 408 Request Timeout" in got, got      # then the server closed it
        assert httpx.get(base + "/api/health").status_code == 200       # the server goes on


# ---------------------------------------------------------------------------------------------- hostile values
def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(wire.encode_jpeg(np.zeros((16, 16, 3), np.uint8), 80))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def test_a_huge_jpeg_header_is_bad_size_and_a_huge_seed_names_seed(engine):
    with pytest.raises(wire.FrameError, match="max_frame_pixels") as e:
        wire.decode_jpeg(jpeg_claiming(65500, 65500), 32, 48, resize=True, max_pixels=4096 * 1024)
    assert e.value.code == "bad_size"
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        for seed in ("9" * 5000, str(2 ** 80), "-1"):
            c.send('{"type": "start", "seed": %s}' % seed)
            assert "seed must be an integer from 0 to 2**63-1" in c.error("bad_value")["message"]
        c.start()
        c.send(wire.pack_input(jpeg_claiming(65500, 65500), 0, 0.0))
        assert "max_frame_pixels" in c.error("bad_size")["message"]
        assert not [m for m in c.messages if m.get("code") == "internal"]
        c.close()
    with pytest.raises(ValueError, match="seed must be a 64-bit integer .*got an integer of 81 bits"):
        engine.driver.open("a red square", seed=2 ** 80)


def test_taehv_with_dummy_weights_is_visible_noise_not_black(engine):
    """TAEHV's decoder has no norms: the generic dummy init decays to ~0 through its ReLU convs, a black frame
    (2x - 1 = -1) under a banner saying "noise". Its dummy weights are scaled to give noise around mid grey."""
    taehv = engine.vae_for(True)
    state = taehv.new_state(1)
    out = taehv.decode(state, torch.randn(1, 2, 16, 32 // 8, 48 // 8, generator=torch.Generator().manual_seed(0)))
    pixels = (out.float() + 1) * 127.5
    assert 60 < float(pixels.mean()) < 200 and float(pixels.std()) > 20, (float(pixels.mean()), float(pixels.std()))


def test_a_stream_whose_output_went_non_finite_is_restarted(engine, monkeypatch):
    """The server reads each chunk on the host anyway (JPEG): a chunk that is not finite ends that stream (the
    client hears why) and it restarts with the same settings, instead of sending NaN frames forever."""
    import sdv2_lab.stream.driver as driver
    calls, real = {"n": 0}, driver.decode_streams

    def poisoned(vae, states, latents):   # every decode goes through the batched call (one per chunk here)
        calls["n"] += 1
        out = real(vae, states, latents)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(driver, "decode_streams", poisoned)
    with serve_in_thread(engine, settings()) as base:
        c = Client(base)
        s = c.start(steps=1)
        parts = chunks()
        feed_chunk(c, s["session"], parts[0])
        c.wait_frames(5)
        for f in parts[1]:
            c.send_frame(f)
        err = c.error("engine")
        assert "output went non-finite" in err["message"] and "restarting it" in err["message"]
        deadline = time.monotonic() + 30
        while stream_info(base, s["session"])["stream"] == s["stream"]:
            assert time.monotonic() < deadline, "the stream was not restarted"
            time.sleep(0.05)
        assert len(c.frames) == 5                                   # the bad chunk was not sent
        feed_chunk(c, s["session"], parts[0])                       # the new stream: a first chunk, served
        c.wait_frames(10)
        assert all(np.isfinite(np.asarray(wire.decode_jpeg(j, 32, 48, resize=False, max_pixels=10 ** 6)[0],
                                          dtype=np.float32)).all() for _, _, j in c.frames)
        c.close()


# ---------------------------------------------------------------------------------------------- SLO numbers
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")'
                    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (NaN|[+-]Inf|-?[0-9.eE+-]+)$')


def parse_prometheus(text: str) -> dict:
    """Text exposition 0.0.4, strictly: every sample belongs to a family announced by # HELP and # TYPE first."""
    families, samples = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in families, f"{name} announced twice"
            families[name] = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in families and kind in ("counter", "gauge", "summary", "histogram", "untyped")
            families[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name = m.group(1)
            family = next((f for f in families if name == f or (families[f] == "summary" and name in
                                                                 (f + "_sum", f + "_count"))), None)
            assert family is not None and families[family], f"{name} before its # HELP / # TYPE"
            samples[(name, m.group(2) or "")] = float(m.group(5))
    return {"families": families, "samples": samples}


def test_slo_numbers_in_api_metrics_and_prometheus(engine):
    with serve_in_thread(engine, settings(target_latency_ms=0.001)) as base:   # every frame misses this target
        c = Client(base)
        s = c.start(seed=2)
        for part in chunks(count=4):
            feed_chunk(c, s["session"], part)
        c.wait_frames(5 + 4 * 2)
        time.sleep(0.3)                                    # the send loop records the last frames it sent
        m = httpx.get(base + "/api/metrics").json()
        for where in (m["latency"], stream_info(base, s["session"])):
            for key in ("latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms", "latency_p99_9_ms",
                        "jitter_ms"):
                assert where[key] is not None and where[key] >= 0, (key, where)
            assert where["latency_p50_ms"] <= where["latency_p90_ms"] <= where["latency_p99_9_ms"]
            assert where["deadline_miss_rate"] == 1.0 and where["target_latency_ms"] == 0.001
        r = httpx.get(base + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        prom = parse_prometheus(r.text)
        fam, smp = prom["families"], prom["samples"]
        assert fam["sdv2_frames_out_total"] == "counter" and fam["sdv2_frame_latency_ms"] == "summary"
        assert smp[("sdv2_frames_out_total", "")] >= 5 + 4 * 2
        assert smp[("sdv2_frame_latency_ms_count", "")] == smp[("sdv2_deadline_misses_total", "")] >= 13
        assert smp[("sdv2_frame_latency_ms", '{quantile="0.999"}')] == m["latency"]["latency_p99_9_ms"]
        assert smp[("sdv2_streams_in_use", "")] == 1 and smp[("sdv2_weights_dummy", "")] == 1
        assert smp[("sdv2_frames_dropped_total", '{reason="stale"}')] >= 0
        c.close()


# ---------------------------------------------------------------------------------------------- the command
def test_sdv2_serve_over_tls_and_ctrl_c_is_a_clean_stop(tmp_path):
    cert, key = self_signed(tmp_path)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "serve", f"serve.port={port}", "height=32", "width=48",
           f"serve.ssl_certfile={cert}", f"serve.ssl_keyfile={key}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=sigint_as_a_terminal_sends_it)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                assert httpx.get(f"https://127.0.0.1:{port}/api/health", verify=trust, timeout=2).json()["status"]
                break
            except httpx.TransportError:
                assert time.monotonic() - t0 < 180, "sdv2 serve did not answer"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"open https://127.0.0.1:{port}" in text and "sdv2 serve: stopped (Ctrl+C)" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


