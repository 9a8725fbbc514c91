"""Lightning's door to the evaluation sources of ``datasets.py`` (kept apart so that reading and checking a dataset
never imports Lightning: a mistake in ``dataset=`` is reported before the seconds that import takes)."""
from __future__ import annotations

from typing import Mapping, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .datasets import EvalDataset, ShardSampler, build_dataset, single_item


class EvalDataModule(pl.LightningDataModule):
    """Serves a source to ``trainer.test`` / ``trainer.predict``, one ``VideoItem`` per batch, split over DDP
    ranks by ``ShardSampler`` (no duplicates, nothing dropped). ``dataset``: a built source, or a conf/dataset
    mapping built in ``setup`` (then ``height`` and ``width`` are needed)."""

    def __init__(self, dataset, height: Optional[int] = None, width: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        self._spec, self.source = (dataset, None) if isinstance(dataset, Mapping) or hasattr(dataset, "keys") \
            else (None, dataset)
        if self._spec is not None and (height is None or width is None):
            raise ValueError("EvalDataModule built from a dataset config needs height and width")
        self.height, self.width, self.num_workers = height, width, num_workers

    def setup(self, stage: Optional[str] = None) -> None:
        if self.source is None:
            self.source = build_dataset(self._spec, self.height, self.width)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self) -> DataLoader:
        self.setup()
        data = EvalDataset(self.source)
        num_replicas, rank = self._world()
        return DataLoader(data, batch_size=1, sampler=ShardSampler(data, num_replicas, rank), collate_fn=single_item,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [] if self.source is None else list(self.source.skipped)
