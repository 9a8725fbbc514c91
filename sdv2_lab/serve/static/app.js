// sdv2 serve: the page. Camera (or a video file) -> JPEG frames over a WebSocket at the server's input rate;
// restyled JPEG frames back (WebSocket, or MJPEG in an <img>), shown at an even pace. No build step, no CDN.
// Wire format (sdv2_lab/serve/wire.py): in  = "SDV2" u32 seq f64 client-ms + JPEG;
//                                       out = "SDV2" u32 seq f64 client-ms u32 index f32 server-ms + JPEG.
"use strict";

const $ = (id) => document.getElementById(id);
const MAGIC = [0x53, 0x44, 0x56, 0x32]; // "SDV2"
const OUT_HEADER = 24;

const ui = {
  source: $("source"), file: $("file"), prompt: $("prompt"), applyPrompt: $("apply-prompt"), steps: $("steps"),
  noise: $("noise"), noiseValue: $("noise-value"), taehv: $("taehv"), transport: $("transport"),
  start: $("start"), pause: $("pause"), stop: $("stop"), input: $("input"), output: $("output"),
  mjpeg: $("output-mjpeg"), message: $("message"), dummy: $("dummy-banner"), info: $("model-info"),
  state: $("state"), fps: $("fps"), lat50: $("lat50"), lat95: $("lat95"), dropped: $("dropped"),
  sent: $("sent"), received: $("received"), applied: $("applied-prompt"), latSource: $("lat-source"),
  slo: $("slo"),
};

// what the tests (and the curious) can read: window.sdv2
const app = window.sdv2 = {
  health: null, ws: null, state: "idle", width: 96, height: 64, inputFps: 16, output: "ws",
  sent: 0, received: 0, skipped: 0, serverDropped: 0, latencies: [], arrivals: [], queue: [],
  appliedPrompt: null, mediaStream: null, sendTimer: null, encoding: false, seq: 0, lastMessage: null,
  serverStats: null, sessionStart: 0, serverUp: true,
};

// The output rate over a window of FPS_WINDOW_MS (frames in the window / the window, or the time since the
// session's first frame while shorter): chunks arrive a few frames at once, so a rate between first and last
// arrival would swing with each burst at low rates.
const FPS_WINDOW_MS = 5000;
app.rate = function (arrivals, now, since) {
  const recent = arrivals.filter((t) => now - t < FPS_WINDOW_MS);
  if (!recent.length) return 0;
  const span = Math.min(FPS_WINDOW_MS, now - Math.min(since, recent[0]));
  return span > 0 ? recent.length / (span / 1000) : 0;
};

// A new session starts from zero: nothing of the previous one is counted or shown.
app.resetCounters = function () {
  app.sent = 0; app.received = 0; app.skipped = 0; app.serverDropped = 0;
  app.latencies = []; app.arrivals = []; app.serverStats = null; app.sessionStart = performance.now();
  app.queue.splice(0).forEach((b) => b.close());
};

function say(text, kind = "") {
  ui.message.hidden = !text;
  ui.message.textContent = text || "";
  ui.message.className = "banner " + kind;
  app.lastMessage = { text, kind };
}

function setState(state) {
  app.state = state;
  ui.state.textContent = state;
  const live = state === "running" || state === "paused";
  ui.start.disabled = state !== "idle";
  ui.stop.disabled = state === "idle";
  ui.pause.disabled = !live;
  ui.pause.textContent = state === "paused" ? "Resume" : "Pause";
  ui.applyPrompt.disabled = !live;
}

function sizeViews(width, height) {
  app.width = width; app.height = height;
  ui.output.width = width; ui.output.height = height;
  for (const el of [ui.output, ui.mjpeg, ui.input]) el.style.aspectRatio = `${width} / ${height}`;
}

function showHealth(h) {
  app.serverUp = true;
  ui.info.textContent = `${h.model} · VAE ${h.vae} · ${h.width}×${h.height} on ${h.device} · ` +
    `weights ${h.weights} · streams in use ${h.streams}/${h.max_streams}`;
  ui.dummy.hidden = !h.weights_dummy;
}

function serverGone() {
  // the numbers of a server that stopped answering are not shown as if current
  app.serverUp = false;
  ui.info.textContent = "the server is not answering (stopped?)";
}

async function loadHealth() {
  try {
    const h = await (await fetch("/api/health")).json();
    app.health = h;
    app.inputFps = h.input_fps;
    showHealth(h);
    ui.steps.innerHTML = "";
    for (let k = 1; k <= h.max_steps; k++) ui.steps.add(new Option(String(k), String(k), false, k === h.default_steps));
    ui.noise.value = h.default_noise_scale;
    ui.noiseValue.textContent = Number(h.default_noise_scale).toFixed(2);
    ui.taehv.checked = !!h.taehv_default;
    if (!ui.prompt.value) ui.prompt.value = h.default_prompt;
    sizeViews(h.width, h.height);
  } catch (e) {
    say(`The server does not answer (${e}). Is sdv2 serve running?`, "error");
  }
}

// ------------------------------------------------------------------ input
async function openInput() {
  stopInput();
  if (ui.source.value === "file") {
    const f = ui.file.files[0];
    if (!f) throw new Error("pick a video file first");
    ui.input.srcObject = null;
    ui.input.src = URL.createObjectURL(f);
    ui.input.loop = true;
    await ui.input.play();
    return;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser gives no camera access here (use http://127.0.0.1 or https)");
  }
  try {
    app.mediaStream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (e) {
    const why = e.name === "NotAllowedError" ? "the camera was refused" :
      e.name === "NotFoundError" ? "no camera was found" : `the camera failed (${e.name})`;
    throw new Error(`${why}: allow the camera in the browser, or pick "Video file" as the input`);
  }
  ui.input.src = "";
  ui.input.srcObject = app.mediaStream;
  await ui.input.play();
}

function stopInput() {
  if (app.mediaStream) app.mediaStream.getTracks().forEach((t) => t.stop());
  app.mediaStream = null;
}

const grab = document.createElement("canvas");
function sendFrame() {
  const ws = app.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || app.state !== "running") return;
  const v = ui.input;
  if (v.readyState < 2 || !v.videoWidth) return;
  if (app.encoding || ws.bufferedAmount > 512 * 1024) { app.skipped++; return; }  // the socket is backed up
  grab.width = app.width; grab.height = app.height;
  const ctx = grab.getContext("2d");
  // centre crop to the model's aspect (what the server would do), then scale
  const target = app.width / app.height, vw = v.videoWidth, vh = v.videoHeight;
  let sx = 0, sy = 0, sw = vw, sh = vh;
  if (vw / vh > target) { sw = vh * target; sx = (vw - sw) / 2; } else { sh = vw / target; sy = (vh - sh) / 2; }
  ctx.drawImage(v, sx, sy, sw, sh, 0, 0, app.width, app.height);
  app.encoding = true;
  const seq = app.seq++, t = performance.now();
  grab.toBlob(async (blob) => {
    try {
      if (!blob || app.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const msg = new Uint8Array(16 + jpeg.length);
      const dv = new DataView(msg.buffer);
      MAGIC.forEach((b, i) => dv.setUint8(i, b));
      dv.setUint32(4, seq);
      dv.setFloat64(8, t);
      msg.set(jpeg, 16);
      ws.send(msg);
      app.sent++;
    } finally {
      app.encoding = false;
    }
  }, "image/jpeg", 0.85);
}

// ------------------------------------------------------------------ output
async function onFrame(buf) {
  const dv = new DataView(buf);
  const clientMs = dv.getFloat64(8);
  const now = performance.now();
  app.received++;
  app.arrivals.push(now);
  if (clientMs > 0) app.latencies.push(now - clientMs);
  if (app.latencies.length > 200) app.latencies.shift();
  const bitmap = await createImageBitmap(new Blob([new Uint8Array(buf, OUT_HEADER)], { type: "image/jpeg" }));
  app.queue.push(bitmap);
  if (app.queue.length > 12) app.queue.splice(0, app.queue.length - 4).forEach((b) => b.close());
}

let nextDue = 0;
function paint(now) {
  // chunks arrive a few frames at once: show them at the input rate
  const interval = 1000 / app.inputFps;
  if (app.queue.length && now >= nextDue) {
    const bitmap = app.queue.shift();
    ui.output.getContext("2d").drawImage(bitmap, 0, 0, ui.output.width, ui.output.height);
    bitmap.close();
    nextDue = Math.max(nextDue + interval, now - interval);
  }
  requestAnimationFrame(paint);
}
requestAnimationFrame(paint);

function percentile(values, q) {
  if (!values.length) return NaN;
  const v = [...values].sort((a, b) => a - b), k = (v.length - 1) * q / 100, lo = Math.floor(k);
  return v[lo] + (v[Math.min(lo + 1, v.length - 1)] - v[lo]) * (k - lo);
}

function ms(v) { return v === null || v === undefined || isNaN(v) ? "–" : Number(v).toFixed(0); }

setInterval(() => {
  const now = performance.now();
  app.arrivals = app.arrivals.filter((t) => now - t < FPS_WINDOW_MS);
  const st = app.serverStats;
  // MJPEG: the frames go to the <img>, not through this script: show the server's numbers for this stream
  const mjpeg = app.output === "mjpeg";
  const fps = mjpeg ? (st ? st.fps_out : 0) : app.rate(app.arrivals, now, app.sessionStart);
  const live = app.state === "running" || app.state === "paused";
  ui.fps.textContent = live ? Number(fps).toFixed(1) : "–";
  if (mjpeg) {
    ui.lat50.textContent = ms(st && st.latency_p50_ms);
    ui.lat95.textContent = ms(st && st.latency_p95_ms);
  } else {
    ui.lat50.textContent = ms(percentile(app.latencies, 50));
    ui.lat95.textContent = ms(percentile(app.latencies, 95));
  }
  ui.latSource.textContent = mjpeg ? "server" : "camera to screen";
  ui.slo.textContent = st && st.latency_p50_ms !== null && st.latency_p50_ms !== undefined ?
    `server latency p50 ${ms(st.latency_p50_ms)} · p90 ${ms(st.latency_p90_ms)} · p95 ${ms(st.latency_p95_ms)} · ` +
    `p99 ${ms(st.latency_p99_ms)} · p99.9 ${ms(st.latency_p99_9_ms)} ms · over ${ms(st.target_latency_ms)} ms: ` +
    `${(100 * (st.deadline_miss_rate || 0)).toFixed(1)}% · jitter ${ms(st.jitter_ms)} ms` : "";
  ui.dropped.textContent = String(app.serverDropped + app.skipped);
  ui.sent.textContent = String(app.sent);
  ui.received.textContent = String(app.received);
}, 500);

// ------------------------------------------------------------------ the socket
function onControl(msg) {
  switch (msg.type) {
    case "hello":
      break;
    case "started":
      app.resetCounters();
      app.output = msg.output;
      sizeViews(msg.width, msg.height);
      app.inputFps = msg.input_fps;
      app.appliedPrompt = msg.prompt;
      ui.applied.textContent = `· ${msg.prompt}`;
      setState("running");
      say("");
      if (msg.output === "mjpeg") { ui.mjpeg.src = msg.mjpeg; ui.mjpeg.hidden = false; ui.output.hidden = true; }
      else { ui.mjpeg.hidden = true; ui.output.hidden = false; }
      clearInterval(app.sendTimer);
      app.sendTimer = setInterval(sendFrame, 1000 / app.inputFps);
      break;
    case "busy":
      say(`Server busy: ${msg.message}`, "warn");
      closeSocket();
      break;
    case "ack":
      if (msg.control === "prompt") { app.appliedPrompt = msg.prompt; ui.applied.textContent = `· ${msg.prompt}`; }
      if (msg.control === "pause" || msg.control === "resume") setState(msg.state);
      say(`${msg.control} applied${msg.restarted ? " (the stream restarted)" : ""}`);
      break;
    case "info":
      say(msg.message);
      break;
    case "error":
      say(`Error (${msg.code}): ${msg.message}`, "error");
      break;
    case "stats":
      app.serverDropped = msg.dropped_total || 0;
      app.serverStats = msg;
      break;
    case "stopped":
      setState("idle");
      break;
  }
}

function closeSocket() {
  clearInterval(app.sendTimer);
  if (app.ws) { const ws = app.ws; app.ws = null; try { ws.close(); } catch (e) { /* already closed */ } }
  ui.mjpeg.removeAttribute("src");
  setState("idle");
}

async function start() {
  ui.start.disabled = true;
  app.resetCounters();
  say("");
  try {
    await openInput();
  } catch (e) {
    say(`No input: ${e.message}`, "error");
    ui.start.disabled = false;
    return;
  }
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  app.ws = ws;
  setState("starting");
  ws.onopen = () => ws.send(JSON.stringify({
    type: "start", prompt: ui.prompt.value, steps: Number(ui.steps.value), noise_scale: Number(ui.noise.value),
    taehv: ui.taehv.checked, output: ui.transport.value,
  }));
  ws.onmessage = (ev) => {
    if (app.ws !== ws) return;        // a closed session's last messages: not this session's numbers
    if (typeof ev.data === "string") onControl(JSON.parse(ev.data));
    else onFrame(ev.data);
  };
  ws.onclose = (ev) => {
    if (app.ws === ws) {
      closeSocket();
      if (ev.code !== 1000 && ev.code !== 1005) say(`The connection closed (${ev.code} ${ev.reason || ""})`, "error");
    }
  };
}

function control(msg) {
  if (app.ws && app.ws.readyState === WebSocket.OPEN) app.ws.send(JSON.stringify(msg));
}

ui.start.onclick = start;
ui.stop.onclick = () => { control({ type: "stop" }); closeSocket(); stopInput(); };
ui.pause.onclick = () => control({ type: app.state === "paused" ? "resume" : "pause" });
ui.applyPrompt.onclick = () => control({ type: "prompt", prompt: ui.prompt.value });
ui.steps.onchange = () => control({ type: "steps", value: Number(ui.steps.value) });
ui.taehv.onchange = () => control({ type: "taehv", on: ui.taehv.checked });
ui.noise.oninput = () => { ui.noiseValue.textContent = Number(ui.noise.value).toFixed(2); };
ui.noise.onchange = () => control({ type: "noise_scale", value: Number(ui.noise.value) });
ui.source.onchange = () => { ui.file.hidden = ui.source.value !== "file"; };
ui.file.onchange = () => { if (app.state !== "idle") openInput().catch((e) => say(`No input: ${e.message}`, "error")); };

setState("idle");
loadHealth();
setInterval(() => fetch("/api/health").then((r) => r.json()).then(showHealth).catch(serverGone), 3000);
