"""``GET /metrics``: the server's numbers in the Prometheus text exposition format (version 0.0.4), beside the
JSON of ``/api/metrics``. Counters since the server started, gauges of now, and the frame latency as a summary
(quantiles over the recent window, ``_sum`` / ``_count`` over every frame).

    # HELP sdv2_frames_out_total Restyled frames sent to clients.
    # TYPE sdv2_frames_out_total counter
    sdv2_frames_out_total 1234
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from .stats import QUANTILES, quantile_key

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v) -> str:
    if v is None:
        return "NaN"
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2 ** 53 else repr(v)


def _labels(labels: Optional[dict]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Optional[dict], object]],
               suffixed: Iterable[tuple[str, object]] = ()) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            self.lines.append(f"{name}{_labels(labels)} {_value(v)}")
        for suffix, v in suffixed:
            self.lines.append(f"{name}{suffix} {_value(v)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def exposition(hub) -> str:
    """The hub's numbers (``Hub.metrics``) as Prometheus text."""
    m = hub.metrics()
    t = m["totals"]
    e = Exposition()
    e.metric("sdv2_connections_total", "counter", "WebSocket connections accepted.", [(None, t["connections"])])
    e.metric("sdv2_frames_in_total", "counter", "Frames received from clients.", [(None, t["frames_in"])])
    e.metric("sdv2_frames_out_total", "counter", "Restyled frames sent to clients.", [(None, t["frames_out"])])
    e.metric("sdv2_frames_dropped_total", "counter", "Frames dropped, by reason (throttled, stale, output).",
             [({"reason": k}, v) for k, v in t["dropped"].items()])
    e.metric("sdv2_errors_total", "counter", "Error replies sent to clients.", [(None, t["errors"])])
    e.metric("sdv2_busy_replies_total", "counter", "Clients told the server is busy.", [(None, t["busy_replies"])])
    e.metric("sdv2_controls_superseded_total", "counter",
             "Control messages replaced by a newer one of their kind before they ran (or dropped at a disconnect).",
             [(None, t["controls_superseded"])])
    lat, slo = hub.latency, m["latency"]
    e.metric("sdv2_frame_latency_ms", "summary",
             "Server latency of a frame in ms, arrival to its restyled frame sent (quantiles: recent window).",
             [({"quantile": f"{q / 100:g}"}, slo[quantile_key(q)]) for q in QUANTILES],
             [("_sum", lat.sum_ms), ("_count", lat.count)])
    e.metric("sdv2_deadline_misses_total", "counter", "Frames whose latency exceeded serve.target_latency_ms.",
             [(None, lat.misses)])
    e.metric("sdv2_deadline_miss_ratio", "gauge", "Share of recent frames over serve.target_latency_ms.",
             [(None, slo["deadline_miss_rate"])])
    e.metric("sdv2_target_latency_ms", "gauge", "The latency target (serve.target_latency_ms).",
             [(None, slo["target_latency_ms"])])
    e.metric("sdv2_frame_jitter_ms", "gauge", "Mean absolute difference of consecutive frames' latencies (recent).",
             [(None, slo["jitter_ms"])])
    e.metric("sdv2_streams_in_use", "gauge", "Streams held by the engine or opening.", [(None, m["streams_in_use"])])
    e.metric("sdv2_streams_max", "gauge", "Streams the server serves at once (serve.max_streams).",
             [(None, m["max_streams"])])
    e.metric("sdv2_sessions", "gauge", "WebSocket sessions open.", [(None, len(hub.sessions))])
    eng = m["engine"]
    e.metric("sdv2_engine_ticks_total", "counter", "Engine steps run.", [(None, eng["ticks"])])
    e.metric("sdv2_engine_step_ms", "gauge", "Engine step time in ms (recent p50 and p95).",
             [({"quantile": "0.5"}, eng["step_ms_p50"]), ({"quantile": "0.95"}, eng["step_ms_p95"])])
    e.metric("sdv2_stream_fps_out", "gauge", "Output frames per second of each stream (recent window).",
             [({"session": d["id"]}, d["fps_out"]) for d in m["streams"]])
    e.metric("sdv2_weights_dummy", "gauge", "1 when the model's weights are dummy (random): the output is noise.",
             [(None, int(m["weights"] == "dummy"))])
    return e.text()
