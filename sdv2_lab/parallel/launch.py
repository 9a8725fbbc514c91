"""Launching a ``pipe`` job: one process per stage, joined to the job before anything is built.

* ``launch(fn, args, devices=[...])``: one ``python -m sdv2_lab.parallel.worker`` process per rank (``fn`` is
  imported by name: the caller's script is never re-run, so a script without a main guard works) around a
  TCPStore that the launcher owns (process groups and heartbeats); returns every rank's return value. A rank
  that raises or stops answering ends the job: the others stop, stragglers are killed, and ``PipeError`` says in
  one line which rank and what it was doing. NCCL on GPUs, gloo on CPU (and for GPUs that share: ``transport``).
  Settings are checked (``check_pipe``) before any process starts.
* ``python -m torch.distributed.run --nproc_per_node=N -m sdv2_lab.torchrun run|eval <overrides>``: the same
  ranks under torchrun (``__main__.py``).
* ``on_ranks(cfg, fn, ...)``: the front ends' door. ``sdv2 run``, ``sdv2 eval``, the API and ``run_v2v.sh`` pass
  their own function: it runs on every rank (each builds its stage: ``placement.py``) over the same input in
  lockstep, and the last rank writes the video / the results rows (``placement.writes_output``).
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

from ..schema import STALL_TIMEOUT_S
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


# What every rank would say alike (they build from one config and read one input): said by the last rank only,
# the one that writes the output and announces what runs (``placement.writes_output``).
SAID_ONCE = ("sdv2_lab.build", "sdv2_lab.io.video")


def _rank_logging(rank: int, world: int = 1) -> None:
    fmt = f"[%(asctime)s][pipe rank {rank}][%(name)s][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, force=True)
    logging.getLogger("sdv2_lab.parallel").setLevel(logging.INFO)
    for name in SAID_ONCE:
        logging.getLogger(name).setLevel(logging.WARNING if rank == world - 1 else logging.ERROR)


# ---------------------------------------------------------------------------------------------- front ends
def launches(cfg: DictConfig) -> bool:
    """Whether this config needs pipe ranks launched from here: mode=pipe on more than one stage, and this
    process is not already one of them (one stage runs in process)."""
    from .placement import pipe_world
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
    from .placement import check_pipe, pipe_devices, pipe_mode
    check_pipe(cfg)
    p = pipe_mode(cfg)
    return dict(devices=pipe_devices(cfg), timeout_s=float(p.timeout_s), threads=p.threads, transport=p.transport,
                stall_timeout_s=None if p.stall_timeout_s is None else float(p.stall_timeout_s))


def on_ranks(cfg: DictConfig, fn: Callable, *args, **kwargs) -> list:
    """``fn(cfg, *args, **kwargs)`` on every rank of the pipe job that ``cfg`` names, each rank with the config
    on its own device (the launch settings checked first); returns every rank's result. The front ends pass
    themselves: the same function runs on every rank, and ``placement.writes_output`` says which one writes."""
    settings = _settings(cfg)
    return launch(run_with_config, (fn, _container(cfg), _hydra_state(), args, kwargs), **settings)


def run_with_config(fn: Callable, container: dict, hydra: Optional[dict], args: tuple, kwargs: dict):
    """In a rank: the launcher's config (and Hydra state) on this rank's device, then ``fn(cfg, ...)``."""
    from .context import current
    _restore_hydra(hydra)
    cfg = OmegaConf.create(container)
    cfg.device = str(current().device)
    return fn(cfg, *args, **kwargs)
