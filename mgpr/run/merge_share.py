"""Every rank's share of the merge, after predict: rank 0 says go, each finalises its rasters.

Why: the merge's heavy part (reading a raster's records, seam de-duplication, georeferencing)
is per raster, and every GPU of the allocation would otherwise idle while rank 0 does it all.
Once rank 0 knows every rank has published its tiles it sets :data:`GO_KEY`; each rank then
finalises its share (:func:`mgpr.tasks.merge.finalise_share`: for the vector tasks,
published feature files of groups of rasters) and sets ``mgpr/merged/<rank>``; rank 0 does
its own share, waits for the others as long as they are alive
(:func:`~mgpr.run.liveness.wait_for_ranks`, no timeout) and then only gathers. A rank that fails
or dies while merging costs time, never results: rank 0's gather finishes any raster no
published file holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext
from mgpr.tasks.merge import clear_finalised, finalise_share

log = logging.getLogger(__name__)

GO_KEY = "mgpr/merge/go"
GO_MERGE = b"merge"
GO_SKIP = b"skip"
POLL_S = 0.2


def merge_share(
    cfg: PredictConfig,
    run_dir: Path,
    adapter: Any,
    rasters: Sequence[RasterInfo],
    tiles: Sequence[Tile],
    world_size: int,
) -> Callable[[int], object]:
    """A rank's share of the merge (:func:`mgpr.tasks.merge.finalise_share`) and its previews."""
    from mgpr.geo.aoi import map_areas
    from mgpr.monitor.previews import write_share_previews

    task, ctx = get_task(adapter.task), TaskContext.for_run(cfg, rasters, adapter.categories)
    order = [r.path for r in rasters]
    areas = map_areas(rasters)

    def share(rank: int) -> list[str]:
        paths, features = finalise_share(run_dir, task, ctx, tiles, rank, world_size)
        write_share_previews(run_dir, adapter.task, order, paths, cfg.previews, areas, features)
        return paths

    return share


def merged_key(rank: int) -> str:
    """Store key a rank sets once its share of the merge is published (or failed)."""
    return f"mgpr/merged/{rank}"


def skip_merge(store: Any) -> None:
    """Rank 0: tell the waiting ranks there is no merge (a rank failed); best effort."""
    try:
        store.set(GO_KEY, GO_SKIP)
    except Exception:  # noqa: BLE001 - nobody may be listening any more
        pass


def merge_share_others(store: Any, rank: int, finalise: Callable[[int], object]) -> None:
    """A rank other than 0: wait for rank 0's go, finalise this rank's rasters, say so.

    Returns quietly when rank 0 is gone (its store with it) or says there is no merge.
    """
    try:
        while not store.check([GO_KEY]):
            time.sleep(POLL_S)
        go = bytes(store.get(GO_KEY))
    except Exception as exc:  # noqa: BLE001 - rank 0 ended: it merges (or failed) alone
        log.info("rank %d: rank 0's store is gone (%s); no merge share", rank, exc)
        return
    if go != GO_MERGE:
        return
    try:
        start = time.perf_counter()
        finalise(rank)
        log.info("rank %d: its share of the merge took %.1f s", rank, time.perf_counter() - start)
        value = b"ok"
    except Exception as exc:  # noqa: BLE001 - rank 0 redoes this rank's rasters
        log.warning("rank %d: its share of the merge failed (%s); rank 0 redoes it", rank, exc)
        value = f"failed: {type(exc).__name__}: {exc}"[:300].encode()
    try:
        store.set(merged_key(rank), value)
    except Exception:  # noqa: BLE001 - rank 0 ended meanwhile
        pass


def merge_share_rank0(
    store: Any,
    world_size: int,
    exited: Callable[[int], int | None],
    finalise: Callable[[int], object],
    run_dir: Path,
) -> None:
    """Rank 0: clear an older merge's files, say go, finalise its share, wait for the others."""
    from mgpr.monitor.previews import clear_stash
    from mgpr.run.liveness import wait_for_ranks

    clear_finalised(run_dir)
    clear_stash(run_dir)
    store.set(GO_KEY, GO_MERGE)
    start = time.perf_counter()
    try:
        finalise(0)
    except Exception as exc:  # noqa: BLE001 - the gather finishes these rasters itself
        log.warning("rank 0: its share of the merge failed (%s); the gather redoes it", exc)
    for rank, why in wait_for_ranks(store, world_size, exited=exited, key=merged_key):
        log.warning("rank %d did not finish its share of the merge (%s); rank 0 does it", rank, why)
    log.info("merge shares of %d ranks done in %.1f s", world_size, time.perf_counter() - start)
