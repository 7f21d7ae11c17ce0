"""The Lightning callback that streams each rank's predictions into its shard.

It subclasses Lightning's ``BasePredictionWriter`` (``write_interval="batch"``) and hands each
batch's :class:`~mgpr.outputs.shards.TileOutcome` list to a
:class:`~mgpr.outputs.shards.BackgroundShardWriter`
thread, so disk IO overlaps with the next batch's compute. On an exception (Ctrl-C, SIGTERM,
out of memory) every batch already queued is still written before the error propagates: the
tiles finished so far are kept for a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from mgpr.geo.raster import RasterInfo
from mgpr.outputs.shards import BackgroundShardWriter, ShardStore, shard_path

log = logging.getLogger(__name__)


class PredictionShardWriter(BasePredictionWriter):
    """Writes every batch to ``<run_dir>/shards/rank<global_rank>.sqlite``.

    Args:
        run_dir: the run directory (identical on every rank).
        rasters: header of every input raster by path.
        overlap: tile overlap in pixels (marks boxes in seam strips).
        task: ``"classification"`` or ``"detection"``.
        on_write: optional ``(seconds, tiles)`` callback per written batch (run report).
    """

    def __init__(
        self,
        run_dir: Path,
        rasters: dict[str, RasterInfo],
        overlap: int,
        task: str,
        on_write: Callable[[float, int], None] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = run_dir
        self.rasters = rasters
        self.overlap = overlap
        self.task = task
        self.on_write = on_write
        self._writer: BackgroundShardWriter | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Open this rank's shard (the global rank is known once the Trainer is set up)."""
        if self._writer is None:
            store = ShardStore(shard_path(self.run_dir, trainer.global_rank), trainer.global_rank)
            self._writer = BackgroundShardWriter(
                store, self.rasters, self.overlap, self.task, self.on_write
            )

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Queue one batch's outcomes for the writer thread (blocks only if it falls behind)."""
        assert self._writer is not None
        self._writer.put(prediction)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Flush every queued batch and close the shard."""
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep what is queued: write it, then let the exception propagate."""
        self.close(raise_errors=False)

    def close(self, raise_errors: bool = True) -> None:
        """Stop the writer thread (idempotent)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close(raise_errors=raise_errors)
