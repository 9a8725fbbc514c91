"""What every command line shares (``sdv2 run`` / ``eval`` / ``serve``, ``run_v2v.sh``): the hubs' offline defaults,
a check of the command line before Hydra makes any folder, and how a run ends: one line for a mistake (exit 1)
or a Ctrl-C (exit 130), with a run folder that holds nothing but Hydra's own files removed.

The offline defaults belong here, not in ``import sdv2_lab``: a notebook that imports the package keeps its hub
access (the package's loaders read local files only, whatever the environment says). A value the user set is
never replaced. W&B is not in this list: ``conf/logger/wandb.yaml``'s ``offline`` decides its mode.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
EXIT_INTERRUPTED = 130   # as a shell reports a process ended by SIGINT

# Hydra flags after which the command line is Hydra's to read (help, config printing, another config folder).
HANDS_OFF = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--resolve", "--package",
             "-p", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
             "-cd", "--experimental-rerun"}


def offline_defaults() -> None:
    """Nothing a command runs may wait on a network: the hubs' offline switches, unless the user set them."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def end(line: str, code: int = 1) -> None:
    """Print ``line`` to stderr and exit with ``code``."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def one_line(exc: BaseException) -> str:
    """An exception's message for the one-line error: OmegaConf's multi-line messages as ``key: what``."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a required key"
        return f"{key} is not set: give {key}=..."
    if isinstance(exc, OmegaConfBaseException):
        from .configs import first_line
        key = getattr(exc, "full_key", None)
        msg = first_line(getattr(exc, "msg", None) or str(exc))
        return f"{key}: {msg}" if key and key not in msg else msg
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------- before Hydra
def check_command_line(prog: str, config_name: str, argv: list[str]) -> None:
    """What Hydra would fail on with a traceback or a misleading hint, said in one line before it makes any
    folder: a wrong override (an unknown key with the nearest valid ones, a bad choice), a run folder that
    cannot be made, a GPU asked for (by an experiment, say) on a machine without one. A sweep (``-m``) is
    checked on its first combination, before Hydra lists its jobs."""
    if any(a.split("=", 1)[0] in HANDS_OFF for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = first_combination([a for a in argv if not a.startswith("-")])
    from .configs import ConfigError, compose_config
    try:
        cfg = compose_config(config_name, overrides, return_hydra_config=True)
        from .preflight import check_device
        check_device(cfg, because=_because(argv))
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_folder_can_be_made(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir), key)
    except (ConfigError, RuntimeError, OSError) as exc:
        end(f"{prog}: error: {exc}")


def first_combination(overrides: list[str]) -> list[str]:
    """A sweep's overrides with each swept key at its first value (``steps=1,2,3`` -> ``steps=1``); sweeps that
    cannot be listed (intervals, globs) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException
    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            out.append(text)   # compose_config names it
            continue
        if not override.is_sweep_override():
            out.append(text)
        elif override.is_range_sweep() or (override.is_choice_sweep()
                                             and override.value_type != ValueType.GLOB_CHOICE_SWEEP):
            out.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
    return out


def _because(argv: list[str]) -> str:
    chosen = [a for a in argv if a.split("=", 1)[0] in ("experiment", "+experiment")]
    return f" (set by {chosen[-1].lstrip('+')})" if chosen else ""


def check_folder_can_be_made(folder: str, key: str) -> None:
    """Fail now if ``folder`` can neither be found nor made (its nearest existing parent is not a writable
    folder), without making it."""
    path = Path(folder).expanduser().absolute()
    parent = path
    while not parent.exists():
        parent = parent.parent
    if parent == path and path.is_dir():
        probe_in = path
    elif not parent.is_dir():
        raise NotADirectoryError(f"{key}={folder}: cannot make this folder: {parent} is a file")
    else:
        probe_in = parent
    try:   # os.access says yes to root everywhere (/proc, read-only mounts): make and remove a folder instead
        Path(tempfile.mkdtemp(prefix=".sdv2-probe-", dir=probe_in)).rmdir()
    except OSError as exc:
        raise PermissionError(f"{key}={folder}: cannot make folders in {probe_in} "
                              f"({exc.strerror or exc}); give a writable {key}") from None


# ---------------------------------------------------------------------------------------------- how a run ends
def run_task(prog: str, task: Callable, *args, say: Callable[[str], str] = str):
    """Run a command's work. A wrong setting, file or input ends in one line (exit 1, ``SDV2_TRACEBACK=1`` for
    the traceback); Ctrl-C ends in one line (exit 130) saying what was kept. Either way a Hydra run folder that
    holds nothing but ``.hydra/`` and the log is removed. ``say``: a message in the words of this command line
    (``run_v2v.sh``'s flags)."""
    from .preflight import user_errors
    try:
        return task(*args)
    except KeyboardInterrupt as exc:
        discard_empty_run_dir()
        end(f"{prog}: interrupted" + (f": {say(str(exc))}" if str(exc) else ""), EXIT_INTERRUPTED)
    except user_errors() as exc:
        discard_empty_run_dir()
        end(f"{prog}: error: {say(one_line(exc))}")


def guard(prog: str, main: Callable, *args):
    """Around a whole command (imports, Hydra's set-up): Ctrl-C outside the run itself is one line too."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        end(f"{prog}: interrupted", EXIT_INTERRUPTED)


def hydra_run_dir() -> Optional[Path]:
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 -- not under a Hydra app (run_v2v.sh, the API)
        return None


def discard_empty_run_dir() -> None:
    """A failed run leaves no folder holding only Hydra's ``.hydra/`` and an (empty) log: remove it, and the
    folders above it that are left empty (the date folder; a sweep folder with only ``multirun.yaml``), never
    leaving the working directory."""
    run_dir = hydra_run_dir()
    if run_dir is None or not run_dir.is_dir():
        return
    if any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return   # something was made or measured: kept
    for handler in logging.getLogger().handlers[:]:   # Hydra's file handler writes into the folder
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    folder = run_dir.resolve().parent
    while folder != cwd and cwd in folder.parents:
        left = [p.name for p in folder.iterdir()]
        if left and set(left) - {"multirun.yaml"}:
            break
        shutil.rmtree(folder, ignore_errors=True)
        folder = folder.parent
