"""Launching a ``pipe`` job: one process per stage, joined to the job before anything is built.

* ``launch(fn, args, devices=[...])``: one ``python -m sdv2_lab.parallel.worker`` process per rank (``fn`` is
  imported by name: the caller's script is never re-run, so a script without a main guard works) around a
  TCPStore that the launcher owns (process groups and heartbeats); returns every rank's return value. A rank
  that raises or stops answering ends the job: the others stop, stragglers are killed, and ``PipeError`` says in
  one line which rank and what it was doing. NCCL on GPUs, gloo on CPU (and for GPUs that share: ``transport``).
  Settings are checked (``check_pipe``) before any process starts.
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
import pickle
import shutil
import signal
import subprocess
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
           threads: Optional[int] = None, grace_s: float = 5.0, transport: str = "auto",
           stall_timeout_s: Optional[float] = None) -> list:
    """Run ``fn(*args)`` on ``len(devices)`` ranks (rank r on ``devices[r]``); returns each rank's result.
    ``transport``: nccl, host (GPU tensors through host memory: several ranks on one GPU) or auto.
    ``timeout_s``: a rank silent that long (no heartbeat) ends the job; ``stall_timeout_s``: a wait on a live
    peer that makes no progress that long ends it (default: ``STALL_TIMEOUT_S``). A failure ends the job with a
    ``PipeError`` of one line naming the rank; rank tracebacks go to a file the message names (printed instead
    with ``SDV2_TRACEBACK=1``). Each rank is a ``python -m sdv2_lab.parallel.worker`` process: the caller's
    script is never imported again (``fn`` is imported by name)."""
    from .context import resolve_transport
    world = len(devices)
    transport = resolve_transport(transport, devices)
    stall = float(stall_timeout_s if stall_timeout_s is not None else STALL_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(300.0, 2 * timeout_s)))
    health = dist.PrefixStore("sdv2", store)
    tmp = Path(tempfile.mkdtemp(prefix="sdv2-pipe-"))
    if threads is None and all(d == "cpu" for d in devices):
        threads = max(1, (os.cpu_count() or 1) // world)
    call, uses_main = _pickle_call(fn, args)
    job = dict(sys_path=list(sys.path), port=store.port, world=world, devices=list(devices), timeout_s=timeout_s,
               stall_timeout_s=stall, threads=threads, transport=transport, folder=str(tmp),
               main_path=_main_path() if uses_main else None)
    with open(tmp / "job.pkl", "wb") as f:
        pickle.dump(job, f)
        f.write(call)
    procs = []
    kept: Optional[Path] = None
    try:
        for r in range(world):
            procs.append(subprocess.Popen([sys.executable, "-m", "sdv2_lab.parallel.worker", str(tmp), str(r)],
                                          env=_rank_env()))
        failure = _watch(procs, health)
        if failure is not None:
            _stop(procs, grace_s)
            kept = _keep_tracebacks(tmp)
            raise PipeError(failure + (f" (rank tracebacks: {kept})" if kept else ""))
        return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]
    finally:
        _stop(procs, 0.0)
        shutil.rmtree(tmp, ignore_errors=True)


STALL_TIMEOUT_S = 1800.0   # a wait on a live peer (fresh heartbeat) is slowness, not a failure, until this


def _pickle_call(fn, args) -> tuple[bytes, bool]:
    """(fn, args) pickled, and whether they name a function or class of the calling script (``__main__``)."""
    import io
    import types

    class Finder(pickle.Pickler):
        uses_main = False

        def reducer_override(self, obj):
            if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
                Finder.uses_main = True
            return NotImplemented

    buf = io.BytesIO()
    Finder(buf).dump((fn, args))
    return buf.getvalue(), Finder.uses_main


def _main_path() -> Optional[str]:
    """The calling script, for a rank function defined in it (ranks then import it, guarded, as multiprocessing)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        raise ValueError("launch(): the rank function is defined in an interactive session (__main__ has no file); "
                         "define it in a module so that the ranks can import it")
    return os.path.abspath(path)


def _rank_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _keep_tracebacks(tmp: Path) -> Optional[Path]:
    """The failing ranks' tracebacks, moved out of the job folder (it is removed) so that the message can name
    them; None when no rank wrote one (a rank that stopped answering, or SDV2_TRACEBACK=1 printed them)."""
    files = sorted(tmp.glob("rank*.traceback"))
    if not files:
        return None
    keep = Path(tempfile.mkdtemp(prefix="sdv2-pipe-failed-"))
    for f in files:
        shutil.move(str(f), keep / f.name)
    return keep if len(files) > 1 else keep / files[0].name


def _watch(procs, health) -> Optional[str]:
    """Until every rank exited cleanly (None) or the job failed (the message)."""
    while True:
        codes = [p.poll() for p in procs]
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
        if p.poll() is None:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def rank_process(rank: int, job: dict, fn, args) -> None:
    """A launched rank (``worker.py``): join the job over the launcher's store, run ``fn(*args)``, save the result."""
    store = dist.TCPStore("127.0.0.1", job["port"], is_master=False, timeout=datetime.timedelta(seconds=300))
    from . import context
    folder = job["folder"]
    rank_main(lambda: context.init(rank, job["world"], job["devices"][rank], store, timeout_s=job["timeout_s"],
                                   health_store=dist.PrefixStore("sdv2", store), transport=job["transport"],
                                   stall_timeout_s=job["stall_timeout_s"], quiet=True),
              fn, args, os.path.join(folder, f"{rank}.pt"), job["threads"],
              fallback_store=dist.PrefixStore("sdv2", store),
              traceback_path=os.path.join(folder, f"rank{rank}.traceback"))


def rank_main(make_context, fn, args, out_path: Optional[str], threads: Optional[int], fallback_store=None,
              traceback_path: Optional[str] = None) -> None:
    """A rank's life: join, run, drain and meet the others; on any error abort the job naming this rank.
    Launched by ``launch`` (``traceback_path``): the launcher reports the failure in one line and this rank's
    traceback goes to that file (``SDV2_TRACEBACK=1`` prints it); under torchrun the rank prints both."""
    if threads:
        torch.set_num_threads(threads)
    ctx = None
    loud = traceback_path is None or bool(os.environ.get("SDV2_TRACEBACK"))
    try:
        ctx = make_context()
        _rank_logging(ctx.rank, ctx.world)
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
            if loud:
                traceback.print_exc()
            else:
                with open(traceback_path, "w") as f:
                    traceback.print_exc(file=f)
        if loud:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)   # no interpreter teardown: a process group with a dead peer could hang it
    sys.stdout.flush()
    sys.stderr.flush()
    if traceback_path is not None:
        os._exit(0)   # a launched rank: done (no teardown of threads the process groups left behind)


# What every rank would say alike (they build from one config and read one input): said by rank 0 only.
SAID_ONCE = ("sdv2_lab.build", "sdv2_lab.io.video")


def _rank_logging(rank: int, world: int = 1) -> None:
    fmt = f"[%(asctime)s][pipe rank {rank}][%(name)s][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, force=True)
    logging.getLogger("sdv2_lab.parallel").setLevel(logging.INFO)
    for name in SAID_ONCE:   # rank 0 holds every part (text encoder included): its DUMMY line names them all
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)


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
    """The launch settings of a config, checked first (``check_pipe``: devices, the split; before any process)."""
    from .build import check_pipe, pipe_devices
    check_pipe(cfg)
    p = cfg.mode
    stall = p.get("stall_timeout_s", STALL_TIMEOUT_S)
    return dict(devices=pipe_devices(cfg), timeout_s=float(p.get("timeout_s", 60)), threads=p.get("threads"),
                transport=str(p.get("transport", "auto")), stall_timeout_s=None if stall is None else float(stall))


def run(cfg: DictConfig) -> dict:
    """``sdv2 run mode=pipe``: settings, files, input and output checked here, then one process per stage;
    returns the last rank's timings (with every rank's stage times)."""
    from ..cli import input_frames, read_prompt
    from ..io.files import check_output_file
    from ..preflight import check_config
    check_config(cfg)
    settings = _settings(cfg)
    read_prompt(cfg)
    check_output_file(Path(cfg.output.dir) / cfg.output.name, "output video")
    input_frames(cfg)
    return launch(run_rank, (_container(cfg),), **settings)[-1]


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
    if stats.get("encode_fps") is None:   # the last rank does not encode: rank 0's encode rate
        stats["encode_fps"] = stats.get("pipe_encode_fps")
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
    from ..preflight import check_config
    check_config(cfg)
    settings = _settings(cfg)
    run_dir = Path(run_dir)
    launch(eval_rank, (_container(cfg), str(run_dir), list(overrides or []), _hydra_state()), **settings)
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
