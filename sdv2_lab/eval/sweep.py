"""The end of an ``sdv2 eval -m`` sweep: its table, one row per job, and ``all_results.csv`` with every column —
printed by Hydra's multirun-end callback (``conf/eval.yaml``, ``hydra.callbacks``), from the jobs' results files,
so it works the same for jobs run in this process, in local subprocesses or on SLURM (submitit).

    sdv2 eval -m steps=1,2,3,4          # ... jobs ..., then the table
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class GatherResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .results import report
        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"\nsweep {sweep_dir}:", flush=True)
        report(sweep_dir)
