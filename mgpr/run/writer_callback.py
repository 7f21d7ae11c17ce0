"""The Lightning callback that streams each rank's predictions into its part files.

It subclasses Lightning's ``BasePredictionWriter`` (``write_interval="batch"``) and hands each
batch's :class:`~mgpr.tasks.base.TileOutcome` list to a
:class:`~mgpr.outputs.part_thread.BackgroundPartWriter` thread, which publishes them in chunks
(the task's payload, then a manifest) under ``<run_dir>/parts/``, so disk IO overlaps with the
next batch's compute. On an exception (Ctrl-C, SIGTERM, out of memory) every batch already
queued is still published before the error propagates: the tiles finished so far are kept for a
resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from mgpr.outputs.part_thread import CHUNK_SECONDS, BackgroundPartWriter
from mgpr.outputs.parts import OutcomeLike, PartSink, PartWriter
from mgpr.tasks.base import Task, TaskContext

log = logging.getLogger(__name__)

TEST_CHUNK_SECONDS_ENV = "MGPR_TEST_CHUNK_SECONDS"
"""Test-only: publish a chunk after this many seconds instead of
:data:`~mgpr.outputs.part_thread.CHUNK_SECONDS`, so the kill-and-resume tests reach a published
chunk with less simulated work (shorter test runs). Not a user option."""


class PredictionPartWriter(BasePredictionWriter):
    """Publishes every batch under ``<run_dir>/parts/`` as ``r<global_rank>-...`` parts.

    Args:
        run_dir: the run directory (identical on every rank).
        task: the run's task (its payload hook writes each chunk's records).
        ctx: what the task needs of the run (rasters, tiling).
        on_write: optional ``(seconds, tiles)`` callback per published chunk (run report).
    """

    def __init__(
        self,
        run_dir: Path,
        task: Task,
        ctx: TaskContext,
        on_write: Callable[[float, int], None] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = run_dir
        self.task = task
        self.ctx = ctx
        self.on_write = on_write
        self._writer: BackgroundPartWriter | None = None

    def _payload(self, outcomes: Sequence[OutcomeLike], sink: PartSink) -> dict[str, int]:
        return self.task.write_payload(outcomes, self.ctx, sink)  # type: ignore[arg-type]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start this rank's writer (the global rank is known once the Trainer is set up)."""
        if self._writer is None:
            parts = PartWriter(self.run_dir, trainer.global_rank, self._payload)
            seconds = float(os.environ.get(TEST_CHUNK_SECONDS_ENV) or CHUNK_SECONDS)
            self._writer = BackgroundPartWriter(parts, self.on_write, chunk_seconds=seconds)

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
        """Publish every queued outcome and stop the thread."""
        self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep what is queued: publish it, then let the exception propagate."""
        self.close(raise_errors=False)

    def close(self, raise_errors: bool = True) -> None:
        """Stop the writer thread (idempotent)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close(raise_errors=raise_errors)
