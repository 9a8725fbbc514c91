"""Launching a ``pipe`` job: one process per stage, joined to the job before anything is built.

* ``launch(fn, args, devices=[...])``: spawned processes (``torch.multiprocessing``, spawn) around a TCPStore
  that the launcher owns (process groups and heartbeats); returns every rank's return value. A rank that
  raises or stops answering ends the job: the others stop, stragglers are killed, and ``PipeError`` says which
  rank and what it was doing. NCCL on GPUs, gloo on CPU (and for GPUs that share: ``transport``).
* ``python -m torch.distributed.run --nproc_per_node=N -m sdv2_lab.parallel run|eval <overrides>``: the same
  ranks under torchrun (``__main__.py``).
* Front ends: ``run(cfg)`` (``sdv2 run``), ``evaluate(cfg, run_dir)`` (``sdv2 eval``), ``video_to_video(...)``
  (``run_video_to_video(mode="pipe")``, ``./run_v2v.sh pipe``). Every rank streams the same input in lockstep;
  the last rank writes the video / the results row.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .health import ABORT, PipeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the launcher
def launch(fn: Callable, args: tuple = (), *, devices: list[str], timeout_s: float = 60.0,
           threads: Optional[int] = None, grace_s: float = 5.0, transport: str = "auto") -> list:
    """Run ``fn(*args)`` on ``len(devices)`` ranks (rank r on ``devices[r]``); returns each rank's result.
    ``transport``: nccl, host (GPU tensors through host memory: several ranks on one GPU) or auto."""
    from .context import resolve_transport
    world = len(devices)
    transport = resolve_transport(transport, devices)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(120.0, 2 * timeout_s)))
    health = dist.PrefixStore("sdv2", store)
    tmp = Path(tempfile.mkdtemp(prefix="sdv2-pipe-"))
    if threads is None and all(d == "cpu" for d in devices):
        threads = max(1, (os.cpu_count() or 1) // world)
    mp = _mp_context()
    procs = [mp.Process(target=_spawned, name=f"sdv2-pipe-rank{r}",
                        args=(r, world, store.port, devices[r], timeout_s, threads, fn, args, str(tmp / f"{r}.pt"),
                              transport))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        failure = _watch(procs, health)
        if failure is not None:
            _stop(procs, grace_s)
            raise PipeError(failure)
        return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]
    finally:
        _stop(procs, 0.0)
        shutil.rmtree(tmp, ignore_errors=True)


def _mp_context():
    """forkserver: one clean server process imports torch and this package once, and every rank of every launch
    from this process is forked from it (no threads there, so forking is safe); spawn where it is missing."""
    import multiprocessing
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return torch.multiprocessing.get_context("spawn")
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sdv2_lab.parallel.launch", "sdv2_lab.parallel.stage"])
    return ctx


def _watch(procs, health) -> Optional[str]:
    """Until every rank exited cleanly (None) or the job failed (the message)."""
    while True:
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            return None
        msg = health.get(ABORT).decode() if health.check([ABORT]) else ""
        if msg:
            return msg
        for r, c in enumerate(codes):
            if c not in (None, 0):   # it died without saying why (a signal, os._exit, out of memory)
                how = f"signal {signal.Signals(-c).name}" if c < 0 else f"exit code {c}"
                last = _last_words(health, r)
                health.compare_set(ABORT, "", f"pipe rank {r} died ({how}) while {last}")
                return health.get(ABORT).decode()
        time.sleep(0.05)


def _last_words(health, rank: int) -> str:
    try:
        import json
        return json.loads(health.get(f"hb/{rank}").decode())["activity"]
    except Exception:  # noqa: BLE001
        return "starting"


def _stop(procs, grace_s: float) -> None:
    """Give ranks ``grace_s`` to leave by themselves, then end them (a frozen one too)."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.is_alive():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGCONT)
            except (ProcessLookupError, TypeError):
                pass
            p.kill()
            p.join(timeout=5)


def _spawned(rank, world, port, device, timeout_s, threads, fn, args, out_path, transport="nccl") -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=300))
    from . import context
    rank_main(lambda: context.init(rank, world, device, store, timeout_s=timeout_s,
                                   health_store=dist.PrefixStore("sdv2", store), transport=transport),
              fn, args, out_path, threads, fallback_store=dist.PrefixStore("sdv2", store))


def rank_main(make_context, fn, args, out_path: Optional[str], threads: Optional[int], fallback_store=None) -> None:
    """A rank's life: join, run, drain and meet the others; on any error abort the job naming this rank."""
    if threads:
        torch.set_num_threads(threads)
    ctx = None
    try:
        ctx = make_context()
        _rank_logging(ctx.rank)
        result = fn(*args)
        if out_path:
            torch.save(result, out_path)
        ctx.close()
    except BaseException as exc:  # noqa: BLE001 -- every failure ends the job with this rank named
        if ctx is not None:
            msg = ctx.health.fail(exc)
        else:
            msg = f"pipe rank ? failed while joining the job: {type(exc).__name__}: {exc}"
            if fallback_store is not None:
                try:
                    fallback_store.compare_set(ABORT, "", msg)
                except Exception:  # noqa: BLE001
                    pass
        if not isinstance(exc, PipeError):
            traceback.print_exc()
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)   # no interpreter teardown: a process group with a dead peer could hang it


def _rank_logging(rank: int) -> None:
    fmt = f"[%(asctime)s][pipe rank {rank}][%(name)s][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, force=True)
    logging.getLogger("sdv2_lab.parallel").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------- front ends
def launches(cfg: DictConfig) -> bool:
    """Whether this config needs pipe ranks launched from here: mode=pipe on more than one stage, and this
    process is not already one of them (one stage runs in process)."""
    from .build import pipe_world
    from .context import current
    return cfg.mode.name == "pipe" and current() is None and pipe_world(cfg) > 1


def _container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _hydra_state() -> Optional[dict]:
    """The running Hydra app's own config (its choices name the config files a results row reports), or None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return OmegaConf.to_container(HydraConfig.get(), resolve=True)
    except Exception:  # noqa: BLE001 -- composed outside a Hydra app
        return None


def _restore_hydra(state: Optional[dict]) -> None:
    """In a rank: the launcher's Hydra config, so that code asking Hydra (config choices) sees the same."""
    if not state:
        return
    try:
        from hydra.conf import HydraConf
        from hydra.core.hydra_config import HydraConfig
        node = OmegaConf.structured(HydraConf)
        OmegaConf.set_struct(node, False)   # keys of plugins and newer Hydra versions than the dataclass knows
        node = OmegaConf.merge(node, state)
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": node}))
    except Exception as exc:  # noqa: BLE001 -- only labels depend on it
        log.warning("pipe: could not give this rank the launcher's Hydra config (%s): config choices in results "
                    "rows fall back to the config names", exc)


def _settings(cfg: DictConfig) -> dict:
    from .build import pipe_devices
    p = cfg.mode
    return dict(devices=pipe_devices(cfg), timeout_s=float(p.get("timeout_s", 60)), threads=p.get("threads"),
                transport=str(p.get("transport", "auto")))


def run(cfg: DictConfig) -> dict:
    """``sdv2 run mode=pipe``: settings, files, input and output checked here, then one process per stage;
    returns the last rank's timings (with every rank's stage times)."""
    from ..cli import input_frames, read_prompt
    from ..io.files import check_output_file
    from ..preflight import check_config
    check_config(cfg)
    read_prompt(cfg)
    check_output_file(Path(cfg.output.dir) / cfg.output.name, "output video")
    input_frames(cfg)
    return launch(run_rank, (_container(cfg),), **_settings(cfg))[-1]


def run_rank(container: dict) -> dict:
    """One rank of ``sdv2 run``: the same input on every rank, in lockstep; the last writes the video."""
    from tqdm import tqdm

    from ..build import build_pipeline
    from ..cli import expected_output_frames, format_stats, input_frames, read_prompt
    from ..io.video import VideoWriter
    from ..stream.clips import stream_clip
    from .context import current
    ctx = current()
    cfg = OmegaConf.create(container)
    cfg.device = str(ctx.device)
    prompt = read_prompt(cfg)
    frames, in_fps, desc, count = input_frames(cfg)
    pipe = build_pipeline(cfg)
    out_path = Path(cfg.output.dir) / cfg.output.name
    if not ctx.last:
        _, stats = stream_clip(pipe, frames, prompt, input_fps=in_fps, keep_output=False)
        return stats
    print(f"sdv2 run: {cfg.backbone.name} / vae {cfg.vae.name} / pipe on {ctx.world} stage(s) / {cfg.steps} step(s) / "
          f"{cfg.height}x{cfg.width} on {ctx.device} ({str(pipe.dtype).replace('torch.', '')}); input: {desc}")
    total = count if cfg.t2v else expected_output_frames(count, cfg)
    with VideoWriter(out_path, fps=cfg.fps) as writer, \
            tqdm(desc="output frames", total=total, unit="f", mininterval=1.0, dynamic_ncols=True) as bar:
        _, stats = stream_clip(pipe, frames, prompt, input_fps=in_fps, on_frames=writer.write, progress=bar,
                               keep_output=False)
    stats.update(weights="dummy" if pipe.weights_are_dummy else "real", output=str(out_path),
                 device=f"{ctx.world} x {ctx.device.type}", torch=torch.__version__,
                 gpu=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu")
    print(format_stats(stats))
    print(format_pipe(stats))
    timings = cfg.output.get("timings", "timings.json")
    if timings:
        import json
        (Path(cfg.output.dir) / timings).write_text(json.dumps(stats, indent=1, default=str))
    return stats


def format_pipe(s: dict) -> str:
    ranks = int(s.get("pipe_ranks", 0))
    parts = [f"  pipe: {ranks} stage(s), blocks {s.get('pipe_split')}, bubble "
             f"{100 * s['pipe_bubble']:.1f}%" if s.get("pipe_bubble") is not None else
             f"  pipe: {ranks} stage(s), blocks {s.get('pipe_split')}"]
    for r in range(ranks):
        if f"pipe_stage_ms_r{r}" in s:
            parts.append(f"    rank {r}: {s[f'pipe_stage_ms_r{r}']:.1f} ms busy per chunk (blocks "
                         f"{s.get(f'pipe_blocks_ms_r{r}', 0):.1f})")
    if s.get("pipe_rebalances"):
        parts.append(f"    block scheduler: {s['pipe_rebalances']} move(s)")
    return "\n".join(parts)


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: Optional[list[str]] = None):
    """``sdv2 eval mode=pipe``: every rank evaluates the same videos in lockstep; the last records the rows
    (with every rank's stage times and the bubble fraction) in ``run_dir``. Returns the rows."""
    import pandas as pd

    from ..eval.results import read_jsonl
    run_dir = Path(run_dir)
    launch(eval_rank, (_container(cfg), str(run_dir), list(overrides or []), _hydra_state()), **_settings(cfg))
    path = run_dir / "results.jsonl"
    return pd.DataFrame(read_jsonl(path)) if path.exists() else None


def eval_rank(container: dict, run_dir: str, overrides: list[str], hydra: Optional[dict] = None) -> None:
    from ..eval.cli import evaluate as evaluate_here
    from .context import current
    _restore_hydra(hydra)
    ctx = current()
    cfg = OmegaConf.create(container)
    cfg.device = str(ctx.device)
    if not ctx.last:   # the other ranks work in step with it but record nothing
        cfg.logger = {"_target_": None}
        cfg.eval.save_videos = 0
        run_dir = tempfile.mkdtemp(prefix=f"sdv2-pipe-rank{ctx.rank}-")
        sys.stdout = open(os.path.join(run_dir, "console.log"), "w")
    evaluate_here(cfg, run_dir, overrides)


def video_to_video(*, video_path, prompt, output_path, gpu_ids=None, num_gpus=None, device=None,
                   schedule_block=False, overrides=None, **seed_args) -> str:
    """``run_video_to_video(mode="pipe", gpu_ids=[0, 1], num_gpus=2, ...)``: the whole file through the pipeline
    on ``num_gpus`` stages (default 2, or ``len(gpu_ids)``); writes ``output_path``."""
    from ..build import compose_config
    from ..seed_config import quote, seed_overrides
    if gpu_ids is not None and num_gpus is not None and num_gpus != len(gpu_ids):
        raise ValueError(f"pipe mode: num_gpus={num_gpus} but gpu_ids={list(gpu_ids)} ({len(gpu_ids)} ids)")
    n = len(gpu_ids) if gpu_ids else (num_gpus or 2)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ov = [o for o in seed_overrides(mode="single", device=device, **seed_args) if not o.startswith("mode=")]
    out = Path(output_path).expanduser().absolute()
    ov += ["mode=pipe", f"num_gpus={n}", f"mode.schedule_block={str(bool(schedule_block)).lower()}",
           "input=file", f"input.video={quote(Path(video_path).expanduser().absolute())}",
           f"input.prompt={quote(prompt)}", f"output.dir={quote(out.parent)}", f"output.name={quote(out.name)}",
           "output.timings=null"]
    if gpu_ids:
        ov.append(f"mode.gpu_ids=[{','.join(str(int(i)) for i in gpu_ids)}]")
    cfg = compose_config("config", ov + list(overrides or []))
    run(cfg)
    return str(out)
