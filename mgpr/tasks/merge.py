"""The run's merge (after every rank finished): prove exactly-once, then the task's merge.

Spread over ranks by raster: :func:`assign_rasters` gives each rank a share of the rasters
(the same answer on every rank, from the plan alone), each rank finalises its share
(:func:`finalise_share`: for the vector tasks, feature files of groups of rasters), and rank 0's
:func:`merge_run` gathers them into the layers, finishing itself any raster whose file is not
there (a rank that died while merging costs time, never results).

:func:`merge_run` builds the :class:`~mgpr.outputs.ledger.Ledger` of the plan against the
published parts, writes ``missing_tiles.txt`` when planned tiles are in no part (the caller
fails the run with exit 4 once the outputs and the summary are written), and hands the ledger's
picks to the task, which writes the outputs from each done tile's one kept part.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from mgpr.geo.tiling import Tile
from mgpr.outputs.features import features_dir
from mgpr.outputs.ledger import build_ledger, write_missing
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import MergeResult, Task, TaskContext


def merge_run(
    run_dir: Path,
    task: Task,
    ctx: TaskContext,
    tiles: Sequence[Tile],
    output_format: str = "gpkg",
    output_name: str = "predictions",
    use_finalised: bool = False,
    box_cap: int | None = None,
) -> MergeResult:
    """Account every planned tile once, then write the task's outputs.

    Args:
        run_dir: the run directory.
        task: the run's task.
        ctx: the run's task context (rasters, tiling, thresholds).
        tiles: the whole plan (every input's tiles, as the run planned them).
        output_format: ``gpkg``, ``parquet`` or ``both``.
        output_name: file stem of single-file formats (``predictions.gpkg``).
        use_finalised: gather what the ranks' :func:`finalise_share` published.
        box_cap: detection: boxes one tile keeps at most (``max_detections``; None: no cap);
            predicted tiles with that many records are counted in ``tiles_at_box_cap``, from
            the ledger's per-tile record counts (no records are read for it).
    """
    by_key = {t.id.key(): t for t in tiles}
    ledger = build_ledger(run_dir, by_key)
    missing_path = write_missing(run_dir, ledger.missing)
    try:
        result = task.merge(run_dir, ledger, ctx, by_key, output_format, output_name, use_finalised)
    finally:
        clear_finalised(run_dir)
    result.tiles_planned = len(ledger.planned)
    result.tiles_done = ledger.count("done")
    result.tiles_empty = ledger.count("empty")
    result.tiles_failed = ledger.count("failed")
    result.tiles_missing = len(ledger.missing)
    result.failed = ledger.failed()
    result.missing_path = missing_path
    result.duplicate_tiles = ledger.duplicates
    result.empty_rasters = empty_rasters(ledger.entries, tiles)
    if box_cap is not None and task.name == "detection":
        result.tiles_at_box_cap = sum(
            1 for e in ledger.entries.values() if e.status == "done" and e.n_records >= box_cap
        )
    return result


def empty_rasters(entries: dict[str, object], tiles: Sequence[Tile]) -> list[str]:
    """Inputs (in plan order) all of whose planned tiles the ledger accounts as empty."""
    planned: dict[str, list[str]] = {}
    for tile in tiles:
        planned.setdefault(tile.id.path, []).append(tile.id.key())
    return [
        path
        for path, keys in planned.items()
        if all(getattr(entries.get(k), "status", None) == "empty" for k in keys)
    ]


def assign_rasters(ctx: TaskContext, tiles: Sequence[Tile], world_size: int) -> list[list[str]]:
    """Each rank's rasters: largest first (planned tiles) to the least loaded rank.

    Deterministic (ties by raster order, then rank), so every rank computes the same answer.
    """
    counts = {path: 0 for path in ctx.rasters}
    for tile in tiles:
        counts[tile.id.path] = counts.get(tile.id.path, 0) + 1
    position = {path: i for i, path in enumerate(ctx.rasters)}
    order = sorted(ctx.rasters, key=lambda p: (-counts[p], position[p]))
    shares: list[list[str]] = [[] for _ in range(max(1, world_size))]
    load = [0] * len(shares)
    for path in order:
        rank = min(range(len(shares)), key=lambda r: (load[r], r))
        shares[rank].append(path)
        load[rank] += counts[path]
    return shares


def finalise_share(
    run_dir: Path,
    task: Task,
    ctx: TaskContext,
    tiles: Sequence[Tile],
    rank: int,
    world_size: int,
) -> tuple[list[str], Mapping[str, FeatureBatch]]:
    """Finalise this rank's rasters (its share of :func:`assign_rasters`).

    Returns the rasters and the features published for them (none for segmentation).
    """
    paths = assign_rasters(ctx, tiles, world_size)[rank]
    if not paths:
        return paths, {}
    by_key = {t.id.key(): t for t in tiles}
    ledger = build_ledger(run_dir, by_key)
    return paths, task.finalise(run_dir, ledger, ctx, by_key, paths)


def clear_finalised(run_dir: Path) -> None:
    """Remove the per-raster files of a merge (before a new merge, and once it is written)."""
    shutil.rmtree(features_dir(run_dir), ignore_errors=True)
