"""``pipe`` mode on CPU with gloo: stages in separate processes give exactly ``single``'s outputs (2 and 3 ranks,
>= 40 chunks with KV-cache eviction, streams joining and leaving, blocks moved mid-stream by the block scheduler
and by force); a rank that raises or freezes ends the job within the timeout with an error naming it; a
finished run exits; stages load only their blocks; the block scheduler's and the predictor's arithmetic; the
real front ends (``sdv2 run``, a ``sdv2 eval`` sweep over single and pipe)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pipe_ranks as pr
from sdv2_lab.backbones.checkpoints import CheckpointError, load_backbone, stage_parts
from sdv2_lab.backbones.wan_dit import WanDiTConfig
from sdv2_lab.parallel import PipeError, balance
from sdv2_lab.parallel.launch import launch
from sdv2_lab.parallel.predict import OneGPU, main as predict_main, predict

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a watercolor street", "neon lights", "a red square"]


def single_reference(steps, specs):
    """What single mode makes of these streams (one thread: as each rank computes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs, _ = pr.run_streams(pr.single(steps, streams=len(specs)), specs, PROMPTS[:len(specs)],
                                 list(range(7, 7 + len(specs))))
    finally:
        torch.set_num_threads(threads)
    return outs


def run_pipe(steps, counts, specs, options=None, timeout_s=30.0):
    res = launch(pr.rank_streams, (steps, counts, specs, PROMPTS[:len(specs)], list(range(7, 7 + len(specs))),
                                   "dummy", options), devices=["cpu"] * len(counts), timeout_s=timeout_s, threads=1)
    assert all(r[0] == [None] * len(specs) for r in res[:-1])   # only the last rank has frames
    return res[-1]


# ---------------------------------------------------------------------------------------------- identical outputs
def test_two_ranks_equal_single_with_the_block_scheduler_moving_blocks():
    """44 and 30 chunks (the cache evicts from chunk 5 on), two streams in one job until the second leaves; rank 1
    is made slow, so the measured stage times make the block scheduler move blocks to rank 0 mid-stream."""
    specs = [(44, 0), (30, 1)]
    ref = single_reference(2, specs)
    outs, stats, moves, ranges = run_pipe(2, [3, 3], specs, dict(schedule_block=True, balance_every=4,
                                                                 slow={"rank": 1, "ms_per_block": 15}))
    assert moves and balance.counts_of(ranges)[0] > 3, moves        # blocks went to the faster rank
    assert ref[0].shape[0] == 1 + 4 * 44 and ref[1].shape[0] == 1 + 4 * 30
    for a, b in zip(ref, outs):
        assert a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    s = stats[0]
    assert s["pipe_ranks"] == 2 and s["pipe_rebalances"] == len(moves)
    assert 0 <= s["pipe_bubble"] < 1 and s["pipe_stage_ms_r0"] > 0 and s["pipe_decode_ms_r1"] > 0


def test_three_ranks_equal_single_with_forced_moves():
    """3 steps over 3 stages (a single stream keeps them busy), 42 chunks; blocks handed over twice mid-stream,
    once across two boundaries at a time."""
    specs = [(42, 2)]
    ref = single_reference(3, specs)
    outs, stats, moves, ranges = run_pipe(3, [2, 2, 2], specs, dict(rebalance_at={10: [1, 2, 3], 25: [3, 1, 2]}))
    assert moves == [(10, [1, 2, 3]), (25, [3, 1, 2])] and ranges == [(0, 3), (3, 4), (4, 6)]
    assert torch.equal(ref[0], outs[0]), (ref[0] - outs[0]).abs().max()
    assert stats[0]["pipe_split"] == "[3, 1, 2]"


def test_graphed_units_equal_single_emulated_on_cpu():
    """Stream-batch units replayed from CUDA graphs (emulated on CPU: a replay re-runs the captured call with the
    objects of its capture, so anything the key or the static buffers miss replays stale): static plans in one
    buffer per row set, a graph per (blocks, rows, slot, filling / full cache); blocks moved mid-stream drop them.
    Static plans attend over the whole cache with the unwritten part masked, so equal to single within float
    rounding, not bit for bit."""
    specs = [(34, 1)]
    ref = single_reference(3, specs)
    outs, stats, moves, ranges = run_pipe(3, [3, 3], specs, dict(emulate_graphs=True, rebalance_at={20: [4, 2]}))
    assert moves == [(20, [4, 2])]
    s = stats[0]
    assert s["pipe_graph_replays_r0"] > 50 and s["pipe_graph_replays_r1"] > 50, s
    assert s["pipe_graph_captures_r1"] >= 2 * 3, s     # 3 slots, filling and full, captured again after the move
    assert ref[0].shape == outs[0].shape
    torch.testing.assert_close(outs[0], ref[0], atol=2e-5, rtol=0)


def test_one_stage_is_the_whole_model_in_process():
    ref = single_reference(2, [(8, 0)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs, stats = pr.run_streams(pr.stage(2, [6]), [(8, 0)], PROMPTS[:1], [7])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ref[0], outs[0])
    assert stats[0]["pipe_ranks"] == 1 and stats[0]["pipe_split"] == "[6]"


# ---------------------------------------------------------------------------------------------- failures
def test_a_failing_rank_ends_the_job_naming_it_in_one_line():
    t0 = time.monotonic()
    with pytest.raises(PipeError) as err:
        launch(pr.rank_streams, (2, [3, 3], [(20, 0)], PROMPTS[:1], [7], "dummy",
                                 dict(fail={"rank": 1, "job": 6, "how": "raise"})),
               devices=["cpu"] * 2, timeout_s=4.0, threads=1)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "pipe rank 1 (blocks 3-5, head, VAE decode) failed while job 6" in msg
    assert "RuntimeError: injected failure at job 6" in msg and "\n" not in msg
    where = Path(msg.split("(rank tracebacks: ")[1].rstrip(")"))          # the traceback is kept, not printed
    assert "Traceback" in where.read_text() and "injected failure" in where.read_text()
    assert took < 60, took   # start-up (processes, imports) + the grace to end the others


@pytest.fixture
def busy_cpu():
    """A busy background process: the ranks run on a loaded CPU."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    p.kill()
    p.wait()


def test_a_slow_rank_is_not_a_dead_one_on_a_loaded_cpu(busy_cpu):
    """Timeouts are for silence, not slowness: rank 0 takes 2 timeouts before it sends the prompt's context (a
    long stage build) while rank 1 waits for it: the job runs to the end, its output equal to single's. A rank
    frozen mid-stream (no heartbeat) ends the job naming it. Neither depends on the machine's speed: the slow rank
    is slow by a multiple of the timeout and keeps its heartbeat; the frozen one stops its heartbeat."""
    timeout, specs = 3.0, [(6, 0)]
    outs, _, _, _ = run_pipe(2, [3, 3], specs, dict(stall={"rank": 0, "at": "prompt", "seconds": 2 * timeout}),
                             timeout_s=timeout)
    assert torch.equal(outs[0], single_reference(2, specs)[0])
    with pytest.raises(PipeError, match=r"pipe rank 1 stopped answering: no heartbeat for [0-9.]+ s \(timeout 3 s\); "
                                        r"it was last job 4: an injected failure \(freeze\)"):
        launch(pr.rank_streams, (2, [3, 3], [(8, 0)], PROMPTS[:1], [7], "dummy",
                                 dict(fail={"rank": 1, "job": 4, "how": "freeze"})),
               devices=["cpu"] * 2, timeout_s=timeout, threads=1, grace_s=1.0)


# ---------------------------------------------------------------------------------------------- stage weights
def test_a_stage_reads_only_its_parts_strictly(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import safetensors
    cfg = WanDiTConfig(name="tiny6", **pr.TINY6)
    full = load_backbone(cfg, "dummy", dtype=torch.float32, seed=3)
    sd = {k: v.contiguous().clone() for k, v in full.state_dict().items()}
    wan = tmp_path / "wan"
    wan.mkdir()
    save_file(sd, str(wan / "diffusion_pytorch_model.safetensors"))
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "model.pt")
    reads = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, k):
            reads.append(k)
            return self.f.get_tensor(k)

        def get_slice(self, k):   # shapes come from the header: no tensor data is read
            return self.f.get_slice(k)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    parts = stage_parts(6, 2, 4, embed=False, head=True)
    for source in (wan, tmp_path / "model.pt"):
        reads.clear()
        stage = load_backbone(cfg, source, dtype=torch.float32, parts=parts)
        assert stage.held_parts() == parts
        held = {k: v for k, v in stage.state_dict().items() if not v.is_meta}
        assert set(held) == {k for k in sd if k.startswith(("blocks.2.", "blocks.3.", "head."))}
        for k, v in held.items():
            assert torch.equal(v, sd[k]), k
        if source == wan:
            assert set(reads) == set(held)           # the other blocks were never read
    # dummy weights: a stage's share equals the full model's
    dummy = load_backbone(cfg, "dummy", dtype=torch.float32, seed=3, parts=stage_parts(6, 0, 2, embed=True, head=False))
    for k, v in dummy.state_dict().items():
        if not v.is_meta:
            assert torch.equal(v, sd[k]), k
    # strict against the whole model: a key of another stage missing from the file is still an error
    del sd["blocks.5.ffn.0.weight"]
    save_file(sd, str(wan / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys.*blocks.5.ffn.0.weight"):
        load_backbone(cfg, wan, dtype=torch.float32, parts=parts)


def test_kv_cache_layers_hand_over_and_plans_split_by_slot():
    cfg = WanDiTConfig(name="tiny6", **pr.TINY6)
    dit = load_backbone(cfg, "dummy", dtype=torch.float32)
    a = dit.new_cache(4, pr.H, pr.W, 6, 3, 0.2, dtype=torch.float32, layers=(0, 3))
    b = dit.new_cache(4, pr.H, pr.W, 6, 3, 0.2, dtype=torch.float32, layers=(3, 6))
    dit.set_prompt(a, torch.randn(1, 8, cfg.text_dim))
    dit.set_prompt(b, torch.randn(1, 8, cfg.text_dim))
    for t in (a.k, a.v, a.queue, b.k):
        t.copy_(torch.randint(0, 99, t.shape).to(t.dtype))
    moved = {2: {k: v.clone() for k, v in a.layer_state(2).items()}}
    b.set_layers(2, 6, moved)
    a.set_layers(0, 2)
    assert (a.first_layer, a.end_layer, b.first_layer, b.end_layer) == (0, 2, 2, 6)
    for name, t in moved[2].items():
        assert torch.equal(b.layer_state(2)[name], t), name
    with pytest.raises(ValueError, match="neither held nor handed over"):
        a.set_layers(0, 3)
    S = (pr.H // 16) * (pr.W // 16)
    plan = b.plan([2 * S, 4 * S, 0, S], S, rows=[0, 1, 2, 3])   # rows of different lengths: per-row key masks
    part = plan.select(slice(1, None, 2))
    assert part.rows == [1, 3] and part.starts == [4 * S, S] and part.max_len == plan.max_len == 5 * S
    assert part.row_range is None and part.row_index.tolist() == [1, 3] and part.kv_lens.tolist() == [5 * S, 2 * S]


# ---------------------------------------------------------------------------------------------- arithmetic
def test_split_and_block_scheduler_rules():
    assert balance.default_split(30, 2, first_extra=4, last_extra=6) == [(0, 16), (16, 30)]
    assert balance.counts_of(balance.default_split(30, 4, 3, 3)) == [6, 9, 9, 6]
    with pytest.raises(ValueError, match="each stage needs one"):
        balance.split(2, [0, 0, 0], [1, 1, 1])
    r = [(0, 15), (15, 30)]
    assert balance.propose(r, [10.0, 10.3], [8, 8]) is None                  # within 5%
    assert balance.propose(r, [10.0, 14.0], [8, 12]) == [(0, 16), (16, 30)]   # one block per round, to the faster
    assert balance.propose(r, [10.0, float("nan")], [8, 8]) is None
    assert balance.propose([(0, 1), (1, 30)], [1.0, 29.0], [1, 29]) == [(0, 2), (2, 30)]


def test_predictor(capsys, tmp_path):
    m = OneGPU(layers=30, steps=1, block_ms=1.0, encode_ms=5.0, decode_ms=5.0, act_bytes=4.8e6, link_gbps=100)
    one, two = predict(m, 1), predict(m, 2)
    assert one.fps == pytest.approx(4 / 40e-3) and two.counts == [15, 15] and two.period_ms == pytest.approx(20)
    slow_cycle = predict(OneGPU(layers=32, steps=2, block_ms=1.0, encode_ms=0, decode_ms=0), 8)
    assert slow_cycle.bound.startswith("dependency cycle") and slow_cycle.bubble > 0.2   # n + 1 < W
    bench = {"models": [{"model": "1.3B", "vae": "wan", "predictor": {"layers": 30, "steps": 2, "block_ms": 1.1,
                                                                       "encode_ms": 10, "decode_ms": 17},
                         "measured_fps": {"1": 60.0}}]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    predict_main(["--from", str(tmp_path / "b.json"), "--link-gbps", "200"])
    out = capsys.readouterr().out
    assert "1.3B / 2 step(s) / wan" in out and "60.0" in out and len(out.splitlines()) >= 6


# ---------------------------------------------------------------------------------------------- the front ends
def test_sdv2_run_and_an_eval_sweep_over_single_and_pipe(tmp_path):
    """A pipe run as a user starts it (a file of another size, resized): the DUMMY and resize warnings are said
    once (not once per rank), and the stage rates include rank 0's encode."""
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.io.video import export_video
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    small = ["height=32", "width=48"]
    sdv2 = str(Path(sys.executable).parent / "sdv2")
    export_video((synthetic_clip(21, 48, 64)[0].permute(1, 2, 3, 0) + 1) / 2, tmp_path / "in.mp4", fps=16)
    run = subprocess.run([sdv2, "run", "mode=pipe", "num_gpus=2", *small, "input=file",
                          f"input.video={tmp_path / 'in.mp4'}", "input.prompt=a watercolor street",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipe: 2 stage(s), blocks [1, 1]" in run.stdout and "rank 1:" in run.stdout
    said = run.stdout + run.stderr
    assert said.count("DUMMY weights") == 1 and said.count("resized 64x48 -> 48x32") == 1, said[-3000:]
    assert "encode n/a" not in run.stdout and re.search(r"stages: encode [0-9.]+ FPS", run.stdout), run.stdout
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert timings["output_frames"] == 21 and timings["pipe_ranks"] == 2
    sweep = subprocess.run([sdv2, "eval", "-m", "mode=single,pipe", *small,
                            "logger=none", "metrics=none", "dataset.n=1", "eval.save_videos=0", "eval.warmup=false",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=600,
                           env=env, cwd=ROOT)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    from sdv2_lab.eval.results import gather_results
    rows = gather_results(tmp_path / "sweep")
    assert sorted(rows["mode"]) == ["pipe", "single"] and len(rows) == 2
    pipe_row = rows[rows["mode"] == "pipe"].iloc[0]
    assert pipe_row["num_gpus"] == 2 and pipe_row["pipe_ranks"] == 2 and 0 <= pipe_row["pipe_bubble"] < 1
    assert pipe_row["output_frames"] == rows[rows["mode"] == "single"].iloc[0]["output_frames"]


def test_transport_is_host_staged_when_gpus_repeat():
    """NCCL refuses two ranks on one GPU: auto picks the host-staged transport then, and asking for NCCL there is
    a clear error; CPU ranks and distinct GPUs keep NCCL (gloo on CPU regardless)."""
    from sdv2_lab.parallel.context import resolve_transport
    assert resolve_transport("auto", ["cuda:0", "cuda:0"]) == "host"
    assert resolve_transport("auto", ["cuda:0", "cuda:1"]) == "nccl"
    assert resolve_transport("auto", ["cpu", "cpu"]) == "nccl"
    assert resolve_transport("host", ["cuda:0", "cuda:1"]) == "host"
    with pytest.raises(ValueError, match="NCCL refuses two ranks on one GPU"):
        resolve_transport("nccl", ["cuda:0", "cuda:1", "cuda:0"])
    with pytest.raises(ValueError, match="expected auto, nccl or host"):
        resolve_transport("tcp", ["cpu"])


def test_run_video_to_video_pipe_in_a_script_without_a_main_guard(tmp_path):
    """The seed's README calls run_video_to_video(mode="pipe", ...) at the top level of a script: the ranks must
    not re-run that script (multiprocessing's spawn / forkserver children do, and fail while bootstrapping)."""
    from sdv2_lab.io.synthetic import synthetic_clip
    from sdv2_lab.io.video import export_video, probe_video
    export_video((synthetic_clip(13, 32, 48)[0].permute(1, 2, 3, 0) + 1) / 2, tmp_path / "in.mp4", fps=16)
    (tmp_path / "script.py").write_text(
        'print("the script body ran", flush=True)\n'
        "from sdv2_lab import run_video_to_video\n"
        'run_video_to_video(mode="pipe", gpu_ids=[0, 1], num_gpus=2, video_path="in.mp4",\n'
        '                   prompt="a watercolor painting", output_path="outputs/pipe.mp4", height=32, width=48)\n'
        'print("finished", flush=True)\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("the script body ran") == 1 and "finished" in run.stdout, run.stdout
    assert "bootstrapping" not in run.stderr
    assert probe_video(tmp_path / "outputs" / "pipe.mp4").frames == 13


def test_pipe_errors_are_one_line_and_settings_are_checked_before_any_rank_starts(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    sdv2 = str(Path(sys.executable).parent / "sdv2")
    cases = [(["num_gpus=3"], "mode=pipe with 3 stages needs at least 3 blocks; backbone tiny has 2")]
    if not torch.cuda.is_available():
        cases.append((["num_gpus=2", "device=cuda"], "device=cuda needs a CUDA GPU and this machine has none"))
    for args, want in cases:
        run = subprocess.run([sdv2, "run", "mode=pipe", *args, "height=32", "width=48",
                              f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=120,
                             env=env, cwd=ROOT)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert run.returncode != 0 and len(lines) == 1 and want in lines[0], run.stderr[-2000:]
        assert "pipe rank" not in run.stderr and "Traceback" not in run.stderr       # no rank was started
    # a rank that fails mid-run: one line says which and why; its traceback is in the file the line names
    run = subprocess.run([sdv2, "run", "mode=pipe", "num_gpus=2", "height=32", "width=48", "input.frames=21",
                          "+mode.debug.fail={rank: 1, job: 3, how: raise}", f"hydra.run.dir={tmp_path / 'fail'}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    errors = [ln for ln in run.stderr.splitlines() if "error:" in ln]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(errors) == 1 and "sdv2 run: error: pipe rank 1" in errors[0] and "injected failure at job 3" in errors[0]
    assert "(rank tracebacks: " in errors[0]


def test_torchrun_ranks_run_the_same_front_end(tmp_path):
    """Under torchrun each rank runs ``sdv2 run``'s own function on its stage; the last writes the video."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", SDV2_PIPE_DEVICES="cpu,cpu", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "sdv2_lab.torchrun", "run", "num_gpus=2", "height=32", "width=48",
                          f"output.dir={tmp_path}"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["pipe_ranks"] == 2 and timings["output_frames"] > 0 and (tmp_path / "output.mp4").stat().st_size
    assert run.stdout.count("wrote ") == 1   # one rank writes and reports


def test_pipe_settings_are_typed_once_in_their_schema():
    """conf/mode/pipe.yaml names its schema: every default comes from schema.PipeMode, a misspelt key gets the
    nearest valid one, a wrong type is refused at composition, and the code reads the same values."""
    from sdv2_lab.configs import ConfigError, compose_config
    from sdv2_lab.parallel.placement import options, pipe_mode
    from sdv2_lab.schema import PipeMode
    cfg = compose_config("config", ["mode=pipe", "mode.tolerance=0.2"])
    mode = pipe_mode(cfg)
    assert mode.tolerance == 0.2 and mode.timeout_s == PipeMode.timeout_s and mode.depth == PipeMode.depth
    assert options(cfg).tolerance == 0.2 and options(cfg).balance_every == PipeMode.balance_every
    with pytest.raises(ConfigError, match="mode.tolerance"):
        compose_config("config", ["mode=pipe", "mode.tolerence=0.1"])
    with pytest.raises(ConfigError):
        compose_config("config", ["mode=pipe", "mode.depth=two"])
