"""The page in a real browser: `sdv2 serve` started as the command a user runs, Debian's chromium driven by
Playwright (never `playwright install`), its fake camera playing a Y4M file this test writes. The page loads and
says the weights are dummy, the camera starts, restyled frames arrive and change, a prompt change is applied
mid-stream, FPS / latency / dropped frames are shown, a refused camera and a busy server are said clearly, a
local video file works as the input too (its counters start from zero), MJPEG output shows FPS and latency, the
FPS readout is a windowed rate, and when the server stops (Ctrl+C) the header no longer shows its numbers.
A screenshot is kept: outputs/test-artifacts/serve_browser.png (git-ignored)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from interrupts import sigint_as_a_terminal_sends_it

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/install installs it")   # CI must not hide a missing install
        pytest.skip(why)


sync_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") else None
if sync_api is None:
    import playwright.sync_api as sync_api  # noqa: E402  (in CI a missing playwright is a failure)


def write_y4m(path: Path, width: int = 160, height: int = 120, frames: int = 48, fps: int = 16) -> Path:
    """A raw 4:2:0 clip (header ``C420``, as chromium's fake camera reads it): a bright bar sweeping over
    shifting colours, so that every frame differs."""
    yy, xx = np.mgrid[0:height, 0:width]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420\n".encode())
        for k in range(frames):
            y = (96 + 60 * np.sin(xx / width * 6 + k / 3) + 40 * np.cos(yy / height * 4 - k / 5)).clip(0, 255)
            bar = (k * width // frames)
            y[:, bar:bar + width // 10] = 235
            u = np.full((height // 2, width // 2), (128 + 80 * np.sin(k / 4)), np.float64)
            v = np.full((height // 2, width // 2), (128 + 80 * np.cos(k / 6)), np.float64)
            f.write(b"FRAME\n")
            for plane in (y, u, v):
                f.write(plane.astype(np.uint8).tobytes())
    return path


def write_webm(path: Path, width: int = 160, height: int = 120, frames: int = 32, fps: int = 16) -> Path:
    """A short VP8 clip (the "Video file" input)."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 1] = 8 * k
            img[:, (5 * k) % width:(5 * k) % width + 16] = 255
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sdv2 serve` as a user starts it (tiny model, CPU, dummy weights), one stream at most."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "sdv2_lab.cli", "serve", f"serve.port={port}", "serve.max_streams=1",
           "height=32", "width=48", f"hydra.run.dir={tmp / 'run'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=sigint_as_a_terminal_sends_it)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sdv2 serve exited ({proc.returncode}):\n{log.read_text()}")
            try:
                httpx.get(base + "/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() - t0 < 120, f"sdv2 serve did not answer in 120 s:\n{log.read_text()}"
                time.sleep(0.2)
        started_s = time.monotonic() - t0
        yield base, log, started_s, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


SIGNATURE = """() => { const c = document.getElementById('output');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0; for (let i = 0; i < d.length; i++) s = (s * 31 + d[i]) >>> 0; return s; }"""


def test_page_in_chromium_with_a_fake_camera(server, tmp_path):
    _need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is not installed (apt-get install chromium)")
    base, log, started_s, proc = server
    text = log.read_text()
    assert "DUMMY" in text and f"sdv2 serve: open {base}" in text, text      # the log says so
    assert started_s < 90, f"sdv2 serve took {started_s:.0f} s to answer"
    y4m = write_y4m(tmp_path / "camera.y4m")
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={y4m}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--headless"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base)
            page.wait_for_selector("#dummy-banner", state="visible", timeout=30_000)   # the page says so
            assert "DUMMY" in page.inner_text("#dummy-banner")
            page.fill("#prompt", "a watercolor painting")
            page.click("#start")
            page.wait_for_function("window.sdv2.state === 'running'", timeout=120_000)
            page.wait_for_function("document.getElementById('input').videoWidth > 0", timeout=30_000)  # camera on
            page.wait_for_function("window.sdv2.received >= 9", timeout=120_000)
            signatures = set()
            n = page.evaluate("window.sdv2.received")
            deadline = time.monotonic() + 60
            while page.evaluate("window.sdv2.received") < n + 12 or len(signatures) < 3:
                assert time.monotonic() < deadline, f"output frames stopped or never changed ({signatures})"
                signatures.add(page.evaluate(SIGNATURE))
                time.sleep(0.1)
            # a prompt change, mid-stream: acknowledged by the server, the same stream goes on
            stream_before = httpx.get(base + "/api/metrics").json()["streams"][0]["stream"]
            page.fill("#prompt", "a charcoal sketch")
            page.click("#apply-prompt")
            page.wait_for_function("window.sdv2.appliedPrompt === 'a charcoal sketch'", timeout=60_000)
            assert "a charcoal sketch" in page.inner_text("#applied-prompt")
            s = httpx.get(base + "/api/metrics").json()["streams"][0]
            assert s["prompt"] == "a charcoal sketch" and s["stream"] == stream_before
            n = page.evaluate("window.sdv2.received")
            page.wait_for_function(f"window.sdv2.received >= {n + 8}", timeout=120_000)
            page.wait_for_function("document.getElementById('lat95').textContent !== '–'", timeout=10_000)
            stats = {k: page.inner_text(f"#{k}") for k in ("fps", "lat50", "lat95", "dropped", "sent", "received")}
            assert float(stats["fps"]) > 0 and float(stats["lat95"]) > 0 and int(stats["sent"]) > 0, stats
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "serve_browser.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}\npage stats: {stats}; server up in {started_s:.1f} s")

            # a refused camera is said clearly (and no stream is taken)
            refused = browser.new_page()
            refused.add_init_script("navigator.mediaDevices.getUserMedia = () => "
                                    "Promise.reject(new DOMException('denied', 'NotAllowedError'))")
            refused.goto(base)
            refused.click("#start")
            refused.wait_for_function("window.sdv2.lastMessage && window.sdv2.lastMessage.kind === 'error'")
            assert "camera was refused" in refused.inner_text("#message")
            # the one stream is in use: a second page hears that the server is busy
            other = browser.new_page()
            other.goto(base)
            other.click("#start")
            other.wait_for_function("window.sdv2.lastMessage && window.sdv2.lastMessage.text.includes('busy')",
                                    timeout=60_000)
            assert "busy" in other.inner_text("#message").lower()
            # stop frees the stream
            page.click("#stop")
            deadline = time.monotonic() + 30
            while httpx.get(base + "/api/health").json()["streams"]:
                assert time.monotonic() < deadline, "stop did not free the stream"
                time.sleep(0.1)
            # a local video file as the input instead of the camera
            clip = write_webm(tmp_path / "clip.webm")
            page.select_option("#source", "file")
            page.set_input_files("#file", str(clip))
            page.wait_for_function("window.sdv2.state === 'idle'")
            page.click("#start")
            page.wait_for_function("window.sdv2.state === 'running'", timeout=120_000)
            page.wait_for_function("window.sdv2.received >= 9", timeout=120_000)
            assert page.evaluate("document.getElementById('input').currentSrc").startswith("blob:")
            # this session's counters only: the page has received at most what the server sent this session
            received = page.evaluate("window.sdv2.received")
            assert received <= httpx.get(base + "/api/metrics").json()["streams"][0]["frames_out"], received
            page.click("#stop")
            # the FPS readout is a windowed rate: 4-frame bursts every 2 s read 2 FPS whatever the moment
            rates = page.evaluate("""() => { const a = [];
                for (let k = 0; k < 10; k++) for (let j = 0; j < 4; j++) a.push(2000 * k + j);
                return [10, 500, 1000, 1999].map((d) => window.sdv2.rate(a, 18000 + d, 0)); }""")
            assert all(1.6 <= r <= 2.4 for r in rates), rates
            # MJPEG output: FPS and latency come from the server's numbers for the stream
            page.wait_for_function("window.sdv2.state === 'idle'")
            page.select_option("#transport", "mjpeg")
            page.click("#start")
            page.wait_for_function("window.sdv2.state === 'running' && window.sdv2.output === 'mjpeg'",
                                   timeout=120_000)
            page.wait_for_function("document.getElementById('lat-source').textContent === 'server' && "
                                   "Number(document.getElementById('fps').textContent) > 0 && "
                                   "document.getElementById('lat50').textContent !== '–'", timeout=120_000)
            assert page.inner_text("#lat-source") == "server" and "p99.9" in page.inner_text("#slo")
            page.click("#stop")
            assert not errors, errors
            # the server stops (Ctrl+C): the header says so instead of its last numbers; the server exits cleanly
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, log.read_text()
            page.wait_for_function("window.sdv2.serverUp === false", timeout=30_000)
            assert "not answering" in page.inner_text("#model-info")
            assert "streams in use" not in page.inner_text("#model-info")
            assert "stopped (Ctrl+C)" in log.read_text() and "Traceback" not in log.read_text()
        finally:
            browser.close()
