"""``sdv2 eval`` (also ``python -m sdv2_lab.eval``): the harness as a Hydra app over ``conf/eval.yaml``.

    sdv2 eval                                             # tiny model, CPU, synthetic clips, offline W&B
    sdv2 eval -m steps=1,2,3,4 vae=wan_tiny,taehv_tiny    # a multirun sweep, one folder per combination
    sdv2 eval backbone=wan_1_3b device=cuda trainer.devices=4 trainer.strategy=ddp dataset=folder \
        dataset.root=clips dataset.prompts_file=evaluation.json
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")   # we print where the offline run is and how to sync it

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ..build import CONF_DIR  # noqa: E402

log = logging.getLogger("sdv2.eval")


def make_logger(cfg: DictConfig):
    """The configured Lightning logger (``conf/logger``), or False for none."""
    if not cfg.logger.get("_target_"):
        return False
    from hydra.utils import instantiate
    logger = instantiate(cfg.logger)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)  # Lightning passes anonymous=None; W&B warns about any value ("no effect")
    return logger


def quiet_lightning() -> None:
    """Lightning's INFO lines once (Hydra's root handler would print each a second time), without its tips."""
    logging.getLogger("lightning.pytorch").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage())


def accelerator(cfg: DictConfig) -> str:
    if cfg.trainer.accelerator != "auto":
        return cfg.trainer.accelerator
    return "gpu" if str(cfg.device).startswith("cuda") else "cpu"


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None):
    """Run the evaluation; returns every video's row as a DataFrame (on rank 0; None on other ranks)."""
    import warnings

    import lightning.pytorch as pl
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*treespec.*")   # Lightning's own deprecation noise

    from ..preflight import check_config
    from .datasets import EvalDataModule, build_dataset
    from .module import StreamingEvalModule

    run_dir = Path(run_dir)
    from ..parallel.launch import launches
    if launches(cfg):  # mode=pipe on several GPUs: one process per stage, all on the same videos in lockstep
        from ..parallel.launch import evaluate as evaluate_pipe
        return evaluate_pipe(cfg, run_dir, overrides)
    check_config(cfg)  # settings and weight files, then the dataset: all before any model is built
    dataset = build_dataset(cfg.dataset, cfg.height, cfg.width, min_frames=1 + 4 * int(cfg.frames_per_block))
    data = EvalDataModule(dataset, num_workers=int(cfg.eval.num_workers))
    module = StreamingEvalModule(cfg, run_dir, overrides)
    devices = cfg.trainer.devices
    if accelerator(cfg) == "gpu" and str(cfg.device).startswith("cuda:") and devices == 1:
        devices = [int(str(cfg.device).split(":")[1])]
    trainer = pl.Trainer(accelerator=accelerator(cfg), devices=devices, num_nodes=cfg.trainer.num_nodes,
                         strategy=cfg.trainer.strategy, logger=make_logger(cfg), default_root_dir=str(run_dir),
                         enable_progress_bar=cfg.trainer.enable_progress_bar, enable_model_summary=False,
                         enable_checkpointing=False, inference_mode=True)
    trainer.test(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print_results(module.results, list(cfg.eval.print_columns), run_dir)
    if type(trainer.logger).__name__ == "WandbLogger" and trainer.is_global_zero:
        try:
            run = trainer.logger.experiment
            where = Path(run.dir).parent if run.dir else run_dir / "wandb"
            run.finish()
            offline = bool(cfg.logger.get("offline")) or os.environ.get("WANDB_MODE") == "offline"
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
        with pd.option_context("display.width", 200, "display.max_columns", 30,
                               "display.float_format", "{:.3f}".format):
            print(done[cols].to_string(index=False))
    for _, row in skipped.iterrows():
        print(f"skipped {row.get('video')}: {row.get('error') or 'no reason recorded'}")
    print(f"results: {run_dir / 'results.csv'} (one row per video; all columns), summary: {run_dir / 'summary.json'}")


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    evaluate(cfg, hc.runtime.output_dir, list(hc.overrides.task))


def main() -> None:
    # Lightning's DDP launcher starts each extra rank as `python -m <__main__'s module> argv[1:]` (or runs
    # argv[0] as a file): both must lead back here, whichever way `sdv2 eval` was started.
    import __main__
    import importlib.util
    if getattr(__main__, "__spec__", None) is not None:
        __main__.__spec__ = importlib.util.find_spec("sdv2_lab.eval.__main__")
    sys.argv[0] = str(Path(__file__).with_name("__main__.py"))
    _main()


if __name__ == "__main__":
    main()
