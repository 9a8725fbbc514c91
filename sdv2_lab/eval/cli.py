"""``sdv2 eval`` (also ``python -m sdv2_lab.eval``): the harness as a Hydra app over ``conf/eval.yaml``.

    sdv2 eval                                             # tiny model, CPU, synthetic clips, offline W&B
    sdv2 eval -m steps=1,2,3,4 vae=wan_tiny,taehv_tiny    # a multirun sweep, one folder per combination
    sdv2 eval backbone=wan_1_3b device=cuda trainer.devices=4 trainer.strategy=ddp dataset=folder \
        dataset.root=clips dataset.prompts_file=evaluation.json
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from ..configs import CONF_DIR
from ..entry import check_command_line, guard, offline_defaults, run_task

log = logging.getLogger("sdv2.eval")


def wandb_mode(logger_cfg: DictConfig) -> str:
    """``logger.offline``: true = offline, false = online, null = $WANDB_MODE if you set it, else offline."""
    offline = logger_cfg.get("offline")
    if offline is None:
        return os.environ.get("WANDB_MODE") or "offline"
    return "offline" if offline else "online"


def make_logger(cfg: DictConfig):
    """The configured Lightning logger (``conf/logger``), or False for none. W&B gets its mode as an argument
    (Lightning's own ``offline=True`` would set ``WANDB_MODE`` in this process for good, over the user's
    value); without the ``wandb`` package (a core install) the run logs to CSV instead, and says so."""
    target = cfg.logger.get("_target_")
    if not target:
        return False
    from hydra.utils import instantiate
    if not str(target).endswith("WandbLogger"):
        return instantiate(cfg.logger)
    if importlib.util.find_spec("wandb") is None:
        from lightning.pytorch.loggers import CSVLogger
        save_dir = cfg.logger.get("save_dir") or "."
        log.warning("W&B is not installed (pip install 'sdv2_lab[wandb]'): logging to CSV in %s/csv instead "
                    "(logger=csv says so; logger=none for no logger)", save_dir)
        return CSVLogger(save_dir=save_dir, name="csv")
    params = OmegaConf.to_container(cfg.logger, resolve=True)
    mode = wandb_mode(cfg.logger)
    params.update(offline=False, mode=mode)
    logger = instantiate(params)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)  # Lightning passes anonymous=None; W&B warns about any value ("no effect")
    logger.sdv2_mode = mode
    return logger


def make_callbacks(cfg: DictConfig) -> list:
    """The Lightning callbacks of ``conf/callbacks`` (a mapping name -> ``_target_`` config); a progress bar
    is left out when ``trainer.enable_progress_bar`` is false."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and node.get("_target_"):
            out.append(instantiate(node))
    if not cfg.trainer.get("enable_progress_bar", True):
        out = [cb for cb in out if not isinstance(cb, ProgressBar)]
    return out


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: tuple = ()):
    """The Lightning ``Trainer`` of ``conf/trainer`` (``hydra.utils.instantiate``: every Trainer argument can be
    set, ``trainer.precision=bf16-mixed``, ``trainer.profiler=simple``, ``+trainer.limit_test_batches=2``), with
    the accelerator and devices from ``device``, the logger, the callbacks and this run's folder."""
    from hydra.utils import instantiate
    devices = cfg.trainer.devices
    if accelerator(cfg) == "gpu" and str(cfg.device).startswith("cuda:") and devices == 1:
        devices = [int(str(cfg.device).split(":")[1])]
    return instantiate(cfg.trainer, accelerator=accelerator(cfg), devices=devices, logger=make_logger(cfg),
                       callbacks=[*make_callbacks(cfg), *callbacks], default_root_dir=str(run_dir))


def quiet_lightning() -> None:
    """Lightning's INFO lines once (Hydra's root handler would print each a second time), without its tips or
    its Ctrl-C notice (the run says it is interrupted, in one line)."""
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage() and "KeyboardInterrupt" not in record.getMessage())


def accelerator(cfg: DictConfig) -> str:
    if cfg.trainer.accelerator != "auto":
        return cfg.trainer.accelerator
    return "gpu" if str(cfg.device).startswith("cuda") else "cpu"


def with_run_dir(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``paths.output_dir`` is Hydra's run folder; composed outside a Hydra app (the API, tests) it is
    ``run_dir`` (not the working directory)."""
    from hydra.core.hydra_config import HydraConfig
    if "paths" not in cfg or HydraConfig.initialized():
        return cfg
    cfg = cfg.copy()
    cfg.paths.output_dir = str(run_dir)
    return cfg


def _outcome():
    """A callback that keeps what stopped the run (Lightning turns Ctrl-C into ``sys.exit(1)``)."""
    from lightning.pytorch.callbacks import Callback

    class Outcome(Callback):
        exception: Optional[BaseException] = None

        def on_exception(self, trainer, pl_module, exception):
            self.exception = exception
    return Outcome()


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None,
             metrics: Optional[dict] = None):
    """Run the evaluation; returns every video's row as a DataFrame (on rank 0; None on other ranks).
    ``metrics``: a dict to receive ``trainer.callback_metrics`` (``summary/<measure>``, ``video/<measure>``).
    Ctrl-C ends in ``KeyboardInterrupt("k of n videos kept ...")`` after ``summary.json`` is written over the
    finished videos; another failure writes it too, then raises."""
    import tempfile
    import warnings

    import pandas as pd

    from .results import read_jsonl

    from ..inputs import first_chunk_frames
    from ..preflight import check_config
    from .datasets import build_dataset

    from ..parallel.launch import launches, on_ranks
    from ..parallel.placement import writes_output

    run_dir = Path(run_dir)
    if not writes_output():   # a pipe stage before the last: in step with it on the same videos, recording nothing
        cfg.logger = {"_target_": None}
        cfg.eval.save_videos = 0
        run_dir = Path(tempfile.mkdtemp(prefix="sdv2-pipe-rank-"))
        sys.stdout = open(run_dir / "console.log", "w")
    cfg = with_run_dir(cfg, run_dir)
    check_config(cfg)  # settings and weight files, then the dataset: all before any model is built
    if launches(cfg):  # mode=pipe on several GPUs: one process per stage, each running this function
        on_ranks(cfg, evaluate, str(run_dir), list(overrides or []))
        path = run_dir / "results.jsonl"
        return pd.DataFrame(read_jsonl(path)) if path.exists() else None
    dataset = build_dataset(cfg.dataset, cfg.height, cfg.width, min_frames=first_chunk_frames(cfg))
    quiet_lightning()   # Lightning is imported only now: a mistake above is said without waiting for it
    warnings.filterwarnings("ignore", message=".*treespec.*")   # Lightning's own deprecation noise
    from .datamodule import EvalDataModule
    from .module import StreamingEvalModule
    data = EvalDataModule(dataset, num_workers=int(cfg.eval.num_workers))
    module = StreamingEvalModule(cfg, run_dir, overrides)
    outcome = _outcome()
    trainer = build_trainer(cfg, run_dir, (outcome,))
    try:
        trainer.test(module, datamodule=data, verbose=False)
    except SystemExit:
        if not isinstance(outcome.exception, KeyboardInterrupt):
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)   # Lightning ignores a second Ctrl-C from here
        if not trainer.is_global_zero:
            raise KeyboardInterrupt() from None
        summary = module.finish("interrupted")
        kept = summary["videos"] + summary["skipped"]
        raise KeyboardInterrupt(f"{kept} of {len(dataset)} videos kept ({summary['videos']} measured, "
                                f"{summary['skipped']} skipped): {run_dir / 'results.csv'}, "
                                f"{run_dir / 'summary.json'}") from None
    except BaseException:
        if trainer.is_global_zero:
            module.finish("failed")
        raise
    if metrics is not None:
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if trainer.is_global_zero:
        print_results(module.results, list(cfg.eval.print_columns), run_dir)
    if type(trainer.logger).__name__ == "WandbLogger" and trainer.is_global_zero:
        try:
            run = trainer.logger.experiment
            where = Path(run.dir).parent if run.dir else run_dir / "wandb"
            run.finish()
            offline = getattr(trainer.logger, "sdv2_mode", "offline") == "offline"
            print(f"W&B run: {where}" + (f" (offline; upload with `wandb sync {where}`)" if offline else ""))
        except Exception as exc:  # noqa: BLE001 -- finishing W&B must not fail the run
            log.warning("could not finish the W&B run: %s", exc)
    return module.results


def print_results(results, columns: list[str], run_dir: Path) -> None:
    """The key columns of the finished videos, then each skipped video with its reason."""
    import pandas as pd
    if results is None or results.empty:
        print("no videos were evaluated")
        return
    status = results["status"] if "status" in results else pd.Series("ok", index=results.index)
    done, skipped = results[status != "skipped"], results[status == "skipped"]
    cols = [c for c in columns if c in results.columns]
    if len(done):
        table = done[cols].copy()
        for col in cols:   # a measure that is n/a (its row has a note saying why) reads n/a, not NaN
            note = done[f"{col}_note"] if f"{col}_note" in done else None
            if note is not None and note.notna().any():
                table[col] = [f"{v:.3f}" if pd.notna(v) else "n/a" for v in pd.to_numeric(table[col], errors="coerce")]
        with pd.option_context("display.width", 200, "display.max_columns", 30,
                               "display.float_format", "{:.3f}".format):
            print(table.to_string(index=False))
        for col in cols:
            notes = done[f"{col}_note"].dropna() if f"{col}_note" in done else []
            if len(notes):
                print(f"{col} {notes.iloc[0]} ({len(notes)} of {len(done)} video(s))")
    for _, row in skipped.iterrows():
        print(f"skipped {row.get('video')}: {row.get('error') or 'no reason recorded'}")
    print(f"results: {run_dir / 'results.csv'} (one row per video; all columns), summary: {run_dir / 'summary.json'}")


def evaluate_job(cfg: DictConfig) -> Optional[float]:
    """One Hydra job: the evaluation in Hydra's run folder; returns ``optimized_metric`` (a sweeper, e.g.
    Optuna's, optimises it). Outside a Hydra app the run folder is ``output.dir``."""
    run_dir, overrides = cfg.output.dir, []
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
        run_dir, overrides = hc.runtime.output_dir, list(hc.overrides.task)
    except ValueError:   # HydraConfig not set: called with a composed config
        pass
    metrics: dict = {}
    evaluate(cfg, run_dir, overrides, metrics=metrics)
    return optimized_value(cfg, metrics, Path(run_dir))


def optimized_value(cfg: DictConfig, metrics: dict, run_dir: Path) -> Optional[float]:
    """``optimized_metric`` (``summary/<key>``) of the finished run: from Lightning's callback metrics, else
    (a pipe run, whose ranks are other processes) from ``summary.json``; None, said once, when not measured."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    import json
    try:
        value = json.loads((run_dir / "summary.json").read_text()).get(str(name).removeprefix("summary/"))
    except (OSError, ValueError):
        value = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    log.warning("optimized_metric=%s was not measured in this run (logged: %s)", name,
                ", ".join(sorted(k for k in metrics if k.startswith("summary/"))) or "nothing")
    return None


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> Optional[float]:
    return run_task("sdv2 eval", evaluate_job, cfg)


def main() -> None:
    guard("sdv2 eval", _start)


def _start() -> None:
    # Lightning's DDP launcher starts each extra rank as `python -m <__main__'s module> argv[1:]` (or runs
    # argv[0] as a file): both must lead back here, whichever way `sdv2 eval` was started.
    import __main__
    if getattr(__main__, "__spec__", None) is not None:
        __main__.__spec__ = importlib.util.find_spec("sdv2_lab.eval.__main__")
    offline_defaults()
    os.environ.setdefault("WANDB_SILENT", "true")   # we print where the run is and how to sync an offline one
    check_command_line("sdv2 eval", "eval", sys.argv[1:])
    sys.argv[0] = str(Path(__file__).with_name("__main__.py"))
    _main()


if __name__ == "__main__":
    main()
