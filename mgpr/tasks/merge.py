"""The run's merge (rank 0, after every rank finished): prove exactly-once, then the task's merge.

:func:`merge_run` builds the :class:`~mgpr.outputs.ledger.Ledger` of the plan against the
published parts, writes ``missing_tiles.txt`` when planned tiles are in no part (the caller
fails the run with exit 4 once the outputs and the summary are written), and hands the ledger's
picks to the task, which writes the outputs from each done tile's one kept part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mgpr.geo.tiling import Tile
from mgpr.outputs.ledger import build_ledger, write_missing
from mgpr.tasks.base import MergeResult, Task, TaskContext


def merge_run(
    run_dir: Path,
    task: Task,
    ctx: TaskContext,
    tiles: Sequence[Tile],
    output_format: str = "gpkg",
    output_name: str = "predictions",
) -> MergeResult:
    """Account every planned tile once, then write the task's outputs.

    Args:
        run_dir: the run directory.
        task: the run's task.
        ctx: the run's task context (rasters, tiling, thresholds).
        tiles: the whole plan (every input's tiles, as the run planned them).
        output_format: ``gpkg``, ``parquet`` or ``both``.
        output_name: file stem of single-file formats (``predictions.gpkg``).
    """
    by_key = {t.id.key(): t for t in tiles}
    ledger = build_ledger(run_dir, by_key)
    missing_path = write_missing(run_dir, ledger.missing)
    result = task.merge(run_dir, ledger, ctx, by_key, output_format, output_name)
    result.tiles_planned = len(ledger.planned)
    result.tiles_done = ledger.count("done")
    result.tiles_empty = ledger.count("empty")
    result.tiles_failed = ledger.count("failed")
    result.tiles_missing = len(ledger.missing)
    result.failed = ledger.failed()
    result.missing_path = missing_path
    result.duplicate_tiles = ledger.duplicates
    return result
