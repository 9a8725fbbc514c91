"""The GPU scripts of the VAE work run in their CPU smoke modes (tiny sizes): experiments/profile_vae.py (the floor
method, the conv record, the profile by kind, whole steps for 1 and 2 streams in one call) and
experiments/bench_sidebyside.py's rows for the plugin VAEs and several streams. Their numbers here are CPU
numbers of tiny models: what is checked is that every section runs and writes its JSON."""
import json
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))


def run_main(module, argv, monkeypatch):
    import importlib
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    mod.main()


def test_profile_vae_cpu_smoke(scripts, monkeypatch, tmp_path):
    out = tmp_path / "p.json"
    run_main("profile_vae", ["--device", "cpu", "--height", "16", "--width", "32", "--dims", "8", "--iters", "1",
                             "--streams", "1,2", "--no-floor", "--json", str(out)], monkeypatch)
    r = json.loads(out.read_text())
    assert r["check"][0]["passed"] and r["check"][0]["chunks_per_stream"] == {"A": 4, "B": 4, "C": 4}
    (v,) = r["vaes"]
    assert v["dim"] == 8 and "error" not in v
    for step in ("encode", "decode"):
        assert v[f"{step}_convs"]["calls"] > 10 and v[f"{step}_convs"]["floor_ms"] > 0
        kinds = v[f"{step}_profile"]
        assert kinds["conv"] > 0 and kinds["cache copies"] > 0 and kinds["norm + SiLU (fused pass)"] > 0
    assert {"fused_1", "fused_graph_1", "fused_2", "eager_1"} <= set(v["steps"])
    assert v["memory"]["state_gib_per_stream_480x832"] > 0


def test_floor_variants_compute_the_same_conv(scripts):
    from profile_vae import tap_variants
    x = torch.randn(2, 6, 5, 4, 6, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, 3, dtype=torch.float64)
    ys = {k: fn() for k, fn in tap_variants(x, w).items()}
    for k, y in ys.items():
        torch.testing.assert_close(y.contiguous(), ys["conv3d"].contiguous(), msg=k)


def test_sidebyside_rows_for_plugin_vaes_and_streams_cpu_smoke(scripts, monkeypatch, tmp_path):
    run_main("bench_sidebyside", ["--device", "cpu", "--ref-bench", "", "--frames", "9", "--out", str(tmp_path),
                                  "--configs", "tiny:1:lightvae_tiny:16x32,tiny:1:lighttae_full_tiny:16x32::2"],
             monkeypatch)
    rows = json.loads((tmp_path / "sidebyside_cpu.json").read_text())
    assert [(r["vae"], r["streams"]) for r in rows] == [("lightvae_tiny", 1), ("lighttae_full_tiny", 2)]
    assert all(not r.get("ours_error") and r["ours_e2e_fps"] > 0 for r in rows)
