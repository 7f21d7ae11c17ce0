"""Where results are written: per-rank shards as the run goes, then one merged GeoPackage.

Shards
    Each rank appends to ``<run_dir>/shards/rank<R>.sqlite`` (SQLite, WAL). One transaction per
    batch holds the batch's records *and* the rows that mark its tiles done, so a tile counts as
    done exactly when its records are durable: a crash at any instant loses at most the batch
    being written, and resume (:func:`finished_tile_keys`) re-predicts it. The state is
    human-readable: ``sqlite3 shards/rank0.sqlite 'select * from tiles limit 5'``.

    Tables (coordinates in RASTER pixel corner coordinates, x = column, y = row):

    * ``tiles(tile_key, path, row, col, status, n_records, reason, rank, written_at)``, status is
      ``done``, ``empty`` (all nodata, model not run) or ``failed`` (with ``reason``).
    * ``detections(tile_key, path, x0, y0, x1, y1, score, label, seam, cut)``: ``seam`` = the box
      reaches into an overlap strip shared with a neighbouring tile, ``cut`` = it touches an inner
      tile edge (the object may be truncated).
    * ``classifications(tile_key, path, k, class_id, score)``, ``k`` = 1 for the best class.

Merge (rank 0, after every rank finished)
    :func:`merge_run` reads every shard, de-duplicates detections across tile seams, turns
    pixels into map coordinates (:mod:`mgpr.geo.georef`) and writes ``predictions.gpkg`` to a
    temporary name in the run directory before ``os.replace``: the final file appears whole or
    not at all.
"""

from __future__ import annotations

import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mgpr.errors import OutputError
from mgpr.geo.georef import boxes_to_rings, tile_footprint_ring
from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile, TileId, box_touches_tile_edge, plan_tiles
from mgpr.outputs.formats import vector_writers
from mgpr.outputs.vector import FeatureBatch

log = logging.getLogger(__name__)

STATUS_NAMES = {0: "done", 1: "empty", 2: "failed"}
_STATUS_RANK = {"done": 2, "empty": 1, "failed": 0}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tiles(
    tile_key TEXT PRIMARY KEY, path TEXT, row INTEGER, col INTEGER, status TEXT,
    n_records INTEGER, reason TEXT, rank INTEGER, written_at REAL);
CREATE TABLE IF NOT EXISTS detections(
    tile_key TEXT, path TEXT, x0 REAL, y0 REAL, x1 REAL, y1 REAL, score REAL, label INTEGER,
    seam INTEGER, cut INTEGER);
CREATE TABLE IF NOT EXISTS classifications(
    tile_key TEXT, path TEXT, k INTEGER, class_id INTEGER, score REAL);
CREATE INDEX IF NOT EXISTS detections_path ON detections(path);
CREATE INDEX IF NOT EXISTS classifications_path ON classifications(path);
"""


@dataclass(slots=True)
class TileOutcome:
    """What predict_step produced for one tile (the writer's input).

    Attributes:
        tile: the tile.
        status: 0 done, 1 empty (all nodata), 2 failed.
        reason: why it failed, else "".
        boxes: detection only: (N, 4) float xyxy in TILE pixel corner coordinates.
        scores: (N,) float32 detection scores, or (k,) classification probabilities.
        labels: (N,) int64 detection class ids, or (k,) classification class ids, best first.
    """

    tile: Tile
    status: int
    reason: str = ""
    boxes: npt.NDArray[np.float32] | None = None
    scores: npt.NDArray[np.float32] | None = None
    labels: npt.NDArray[np.int64] | None = None


def shard_dir(run_dir: Path) -> Path:
    """Folder of the per-rank shards of a run."""
    return run_dir / "shards"


def shard_path(run_dir: Path, rank: int) -> Path:
    """The shard file of one global rank."""
    return shard_dir(run_dir) / f"rank{rank}.sqlite"


class ShardStore:
    """One rank's SQLite shard; every :meth:`write` is one durable transaction."""

    def __init__(self, path: Path, rank: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.rank = rank
        self.conn = sqlite3.connect(
            str(path), timeout=60.0, isolation_level=None, check_same_thread=False
        )  # used by the writer thread only
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)

    def write(
        self,
        outcomes: Sequence[TileOutcome],
        rasters: dict[str, RasterInfo],
        overlap: int,
        task: str,
    ) -> int:
        """Append a batch of outcomes and mark their tiles; returns records written."""
        tile_rows: list[tuple[Any, ...]] = []
        det_rows: list[tuple[Any, ...]] = []
        cls_rows: list[tuple[Any, ...]] = []
        now = time.time()
        for out in outcomes:
            key = out.tile.id.key()
            path = out.tile.id.path
            n = 0
            if out.status == 0 and out.scores is not None and out.labels is not None:
                if task == "detection" and out.boxes is not None:
                    rows = _detection_rows(out, rasters[path], overlap)
                    det_rows.extend(rows)
                    n = len(rows)
                else:
                    for k, (cid, score) in enumerate(zip(out.labels, out.scores, strict=True), 1):
                        cls_rows.append((key, path, k, int(cid), float(score)))
                    n = 1
            tile_rows.append(
                (
                    key,
                    path,
                    out.tile.id.row,
                    out.tile.id.col,
                    STATUS_NAMES[out.status],
                    n,
                    out.reason,
                    self.rank,
                    now,
                )
            )
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if det_rows:
                cur.executemany("INSERT INTO detections VALUES (?,?,?,?,?,?,?,?,?,?)", det_rows)
            if cls_rows:
                cur.executemany("INSERT INTO classifications VALUES (?,?,?,?,?)", cls_rows)
            cur.executemany("INSERT OR REPLACE INTO tiles VALUES (?,?,?,?,?,?,?,?,?)", tile_rows)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return len(det_rows) + len(cls_rows)

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed into the main file)."""
        self.conn.close()


def _detection_rows(out: TileOutcome, info: RasterInfo, overlap: int) -> list[tuple[Any, ...]]:
    """Clip boxes to the tile's valid extent and shift them to raster pixels."""
    assert out.boxes is not None and out.scores is not None and out.labels is not None
    tile = out.tile
    boxes = np.asarray(out.boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return []
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, tile.valid_width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, tile.valid_height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    cut = box_touches_tile_edge(
        boxes, tile, 1.0, raster_height=info.height, raster_width=info.width
    )
    # A box reaches a seam when it enters an overlap strip along an inner edge.
    margin = max(float(overlap), 1.0)
    seam = box_touches_tile_edge(
        boxes, tile, margin, raster_height=info.height, raster_width=info.width
    )
    key = tile.id.key()
    rows = []
    for i in np.flatnonzero(keep):
        x0, y0, x1, y1 = boxes[i]
        rows.append(
            (
                key,
                tile.id.path,
                x0 + tile.col_off,
                y0 + tile.row_off,
                x1 + tile.col_off,
                y1 + tile.row_off,
                float(out.scores[i]),
                int(out.labels[i]),
                int(seam[i]),
                int(cut[i]),
            )
        )
    return rows


class BackgroundShardWriter:
    """Writes batches on a thread so the predict loop never waits on disk.

    The queue is bounded (``max_pending`` batches), which keeps memory flat: if the disk is
    slower than the GPUs the predict loop blocks instead of piling results up. An error in the
    thread is re-raised in the caller at the next :meth:`put` or at :meth:`close`.
    """

    def __init__(
        self,
        store: ShardStore,
        rasters: dict[str, RasterInfo],
        overlap: int,
        task: str,
        on_write: Callable[[float, int], None] | None = None,
        max_pending: int = 8,
    ) -> None:
        self.store = store
        self.rasters = rasters
        self.overlap = overlap
        self.task = task
        self.on_write = on_write
        self.records = 0
        self.tiles = 0
        self._queue: queue.Queue[list[TileOutcome] | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mgpr-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                start = time.perf_counter()
                self.records += self.store.write(item, self.rasters, self.overlap, self.task)
                self.tiles += len(item)
                if self.on_write is not None:
                    self.on_write(time.perf_counter() - start, len(item))
            except BaseException as exc:  # surfaced to the predict loop
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise OutputError(
                f"writing results to {self.store.path} failed ({type(self._error).__name__}: "
                f"{self._error}); free disk space or choose another output_dir, "
                "then re-run to resume"
            ) from self._error

    def put(self, outcomes: list[TileOutcome]) -> None:
        """Queue one batch (blocks while ``max_pending`` batches wait)."""
        self._raise_if_failed()
        self._queue.put(outcomes)

    def close(self, raise_errors: bool = True) -> None:
        """Write everything queued, stop the thread and close the shard."""
        self._queue.put(None)
        self._thread.join()
        self.store.close()
        if raise_errors:
            self._raise_if_failed()


# ----------------------------------------------------------------------------- reading shards


def _shard_files(run_dir: Path) -> list[Path]:
    folder = shard_dir(run_dir)
    return sorted(folder.glob("rank*.sqlite")) if folder.is_dir() else []


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60.0)


def tile_statuses(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Best status of every tile across all shards: ``{tile_key: (status, reason)}``.

    A tile written twice (failed once, done on a resume) keeps its best status.
    """
    best: dict[str, tuple[str, str]] = {}
    for path in _shard_files(run_dir):
        for key, status, reason in _query(path, "SELECT tile_key, status, reason FROM tiles"):
            old = best.get(key)
            if old is None or _STATUS_RANK[status] > _STATUS_RANK[old[0]]:
                best[key] = (status, reason or "")
    return best


def _query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only query; a shard another rank is just creating reads as empty."""
    try:
        conn = _connect_ro(path)
    except sqlite3.Error:
        return []
    try:
        return list(conn.execute(sql, params))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def finished_tile_keys(run_dir: Path) -> set[str]:
    """Tiles whose records are durably written (done or empty); failed tiles are retried."""
    return {k for k, (s, _) in tile_statuses(run_dir).items() if s in ("done", "empty")}


def count_written_tiles(run_dir: Path) -> int:
    """Rows in every shard's tile table (cheap; the progress display polls it)."""
    total = 0
    for path in _shard_files(run_dir):
        try:
            rows = _query(path, "SELECT COUNT(*) FROM tiles")
        except sqlite3.Error:
            continue
        total += int(rows[0][0]) if rows else 0
    return total


# ----------------------------------------------------------------------------- merge


@dataclass(slots=True)
class MergeResult:
    """What :func:`merge_run` wrote."""

    output_path: Path | None
    output_paths: list[Path] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)  # layer name -> features
    records: int = 0
    tiles_done: int = 0
    tiles_empty: int = 0
    tiles_failed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (tile_key, reason)
    duplicates_removed: int = 0


def _layer_names(rasters: Sequence[RasterInfo], base: str) -> dict[str | None, str]:
    """One layer per CRS: ``base`` alone when all rasters share one CRS."""
    crss: list[str | None] = []
    for info in rasters:
        if info.crs_wkt not in crss:
            crss.append(info.crs_wkt)
    if len(crss) == 1:
        return {crss[0]: base}
    names: dict[str | None, str] = {}
    for info in rasters:
        if info.crs_wkt not in names:
            label = re.sub(r"[^A-Za-z0-9]+", "_", info.crs_label).strip("_").lower()
            names[info.crs_wkt] = f"{base}_{label}"
    return names


def dedupe_seam_boxes(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.bool_]:
    """Which seam boxes survive cross-tile de-duplication (one raster, raster pixels).

    Two boxes of the same class are the same object when their IoU >= ``nms_iou``
    (torchvision's ``batched_nms``), or, coming from *different* tiles, when their intersection
    over the smaller box's area (IoS) >= ``seam_ios``: a box cut by a tile edge lies inside the
    whole box that the neighbouring tile saw, so its IoU can be low while its IoS is ~1 (the case
    SAHI and GeoDeep handle the same way). Boxes are ranked by (not cut first, score, area), so
    the whole box wins over its truncated copy. Pixel frame and map frame give the same answer:
    an affine map scales every area by the same factor, so IoU and IoS are unchanged.

    A box can only suppress a box it intersects, so the greedy suppression runs independently on
    each connected group of intersecting same-class boxes (found with a shapely STRtree): the
    result equals one global greedy pass, at a cost near-linear in the number of boxes rather
    than quadratic (a 40,000 px orthomosaic can hold 10^5 seam boxes).

    Args:
        boxes: (N, 4) xyxy, raster pixel corner coordinates.
        scores: (N,) scores.
        labels: (N,) class ids.
        tiles: (N,) an integer id of the tile each box came from.
        cut: (N,) True where the box touches an inner tile edge.
        nms_iou: IoU threshold.
        seam_ios: IoS threshold.

    Returns:
        (N,) bool keep mask.
    """
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(boxes)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (left < right) & (labels[left] == labels[right])
    left, right = left[pair], right[pair]
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    groups = np.split(order, bounds)
    pairs = np.array([g for g in groups if len(g) == 2], dtype=np.int64).reshape(-1, 2)
    keep[_dedupe_pairs(pairs, boxes, scores, tiles, cut, nms_iou, seam_ios)] = False
    for members in groups:
        if len(members) > 2:
            keep[members] = _dedupe_group(
                boxes[members],
                scores[members],
                labels[members],
                tiles[members],
                cut[members],
                nms_iou,
                seam_ios,
            )
    return keep


def _dedupe_pairs(
    pairs: npt.NDArray[np.int64],
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.int64]:
    """Indexes suppressed in groups of exactly two boxes, vectorised (the common case).

    Same rule as :func:`_dedupe_group` for two boxes: the one ranked first by (not cut, score,
    area, index) stays; the other goes when IoU > ``nms_iou`` (torchvision's strict rule) or,
    from another tile, when IoS >= ``seam_ios``.
    """
    if len(pairs) == 0:
        return np.empty(0, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # a is ranked first unless b beats it on (cut asc, score desc, area desc); a < b on ties.
    key_a = np.stack([cut[a].astype(np.float64), -scores[a], -area[a]], axis=1)
    key_b = np.stack([cut[b].astype(np.float64), -scores[b], -area[b]], axis=1)
    differs = key_a != key_b
    first_diff = np.argmax(differs, axis=1)
    rows = np.arange(len(pairs))
    b_first = differs.any(axis=1) & (key_b[rows, first_diff] < key_a[rows, first_diff])
    loser = np.where(b_first, a, b)
    ix = np.minimum(boxes[a, 2], boxes[b, 2]) - np.maximum(boxes[a, 0], boxes[b, 0])
    iy = np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    union = area[a] + area[b] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    smaller = np.minimum(area[a], area[b])
    ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    gone = (iou > nms_iou) | ((ios >= seam_ios) & (tiles[a] != tiles[b]))
    suppressed: npt.NDArray[np.int64] = loser[gone].astype(np.int64)
    return suppressed


def _dedupe_group(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.bool_]:
    """Greedy IoU (torchvision) then IoS suppression over one group; see dedupe_seam_boxes."""
    import torch
    from torchvision.ops import batched_nms

    n = len(boxes)
    keep = np.zeros(n, dtype=bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Priority: whole boxes first, then score, then area; ties broken by input order.
    order = np.lexsort((np.arange(n), -area, -scores, cut.astype(np.int64)))
    priority = np.empty(n, dtype=np.float64)
    priority[order] = np.arange(n, 0, -1, dtype=np.float64)
    survivors = batched_nms(
        torch.as_tensor(boxes), torch.as_tensor(priority), torch.as_tensor(labels), nms_iou
    ).numpy()
    cand = np.zeros(n, dtype=bool)
    cand[survivors] = True
    kept: list[int] = []
    for i in order[cand[order]]:
        if kept:
            k = np.asarray(kept)
            ix = np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0])
            iy = np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1])
            inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
            smaller = np.minimum(area[k], area[i])
            ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
            clash = (ios >= seam_ios) & (labels[k] == labels[i]) & (tiles[k] != tiles[i])
            if clash.any():
                continue
        kept.append(int(i))
    keep[kept] = True
    return keep


def merge_run(
    run_dir: Path,
    rasters: Sequence[RasterInfo],
    task: str,
    tile_size: int,
    overlap: int,
    categories: Sequence[str] | None,
    nms_iou: float,
    seam_ios: float,
    output_name: str = "predictions",
    topk: int = 5,
    output_format: str = "gpkg",
) -> MergeResult:
    """Merge every rank's shard into the run's vector outputs (rank 0, after all ranks finished).

    Detections become one polygon per box in the raster's CRS, de-duplicated across seams
    (:func:`dedupe_seam_boxes`); classifications become one polygon per tile (its valid
    footprint) with the top-k classes. Rasters in different CRSs go to one layer per CRS (no
    reprojection: every feature stays in its own raster's CRS). Each layer goes to every writer
    that ``output_format`` selects (:mod:`mgpr.outputs.formats`); writers publish whole files only.
    """
    statuses = tile_statuses(run_dir)
    result = MergeResult(output_path=None)
    for key, (status, reason) in sorted(statuses.items()):
        if status == "done":
            result.tiles_done += 1
        elif status == "empty":
            result.tiles_empty += 1
        else:
            result.tiles_failed += 1
            result.failed.append((key, reason))
    done_keys = {k for k, (s, _) in statuses.items() if s == "done"}
    layer_names = _layer_names(rasters, "detections" if task == "detection" else "classifications")
    per_layer: dict[str, dict[str, Any]] = {}
    for info in rasters:
        layer = layer_names[info.crs_wkt]
        if task == "detection":
            rings, fields, removed = _detections_for_raster(
                run_dir, info, done_keys, categories, nms_iou, seam_ios
            )
            result.duplicates_removed += removed
        else:
            rings, fields = _classifications_for_raster(
                run_dir, info, done_keys, categories, tile_size, overlap, topk
            )
        acc = per_layer.setdefault(layer, {"rings": [], "fields": [], "crs": info.crs_wkt})
        acc["rings"].append(rings)
        acc["fields"].append(fields)
    writers = vector_writers(output_format, run_dir, output_name)
    try:
        for layer, acc in per_layer.items():
            batch = FeatureBatch.concat(
                [FeatureBatch(r, f) for r, f in zip(acc["rings"], acc["fields"], strict=True)]
            )
            for writer in writers:
                writer.write(layer, acc["crs"], batch)
            result.layers[layer] = len(batch)
            result.records += len(batch)
        if per_layer:
            for writer in writers:
                result.output_paths += writer.commit()
    finally:
        for writer in writers:
            writer.abort()
    result.output_path = result.output_paths[0] if result.output_paths else None
    return result


def _read_detections(run_dir: Path, path: str, done_keys: set[str]) -> dict[str, np.ndarray]:
    rows: list[tuple[Any, ...]] = []
    for shard in _shard_files(run_dir):
        rows.extend(
            _query(
                shard,
                "SELECT tile_key, x0, y0, x1, y1, score, label, seam, cut "
                "FROM detections WHERE path = ?",
                (path,),
            )
        )
    rows = [r for r in rows if r[0] in done_keys]
    # Deterministic order whatever the number of ranks that wrote them.
    rows.sort(key=lambda r: (r[0], r[6], -r[5], r[1], r[2], r[3], r[4]))
    keys = np.array([r[0] for r in rows], dtype=object)
    arr = np.array([r[1:] for r in rows], dtype=np.float64).reshape(-1, 8)
    return {
        "tile_key": keys,
        "boxes": arr[:, 0:4],
        "score": arr[:, 4],
        "label": arr[:, 5].astype(np.int64),
        "seam": arr[:, 6] > 0,
        "cut": arr[:, 7] > 0,
    }


def _detections_for_raster(
    run_dir: Path,
    info: RasterInfo,
    done_keys: set[str],
    categories: Sequence[str] | None,
    nms_iou: float,
    seam_ios: float,
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    det = _read_detections(run_dir, info.path, done_keys)
    n = len(det["score"])
    keep = np.ones(n, dtype=bool)
    seam_idx = np.flatnonzero(det["seam"])
    if len(seam_idx):
        _, tile_ids = np.unique(det["tile_key"][seam_idx], return_inverse=True)
        keep_seam = dedupe_seam_boxes(
            det["boxes"][seam_idx],
            det["score"][seam_idx],
            det["label"][seam_idx],
            tile_ids.astype(np.int64),
            det["cut"][seam_idx],
            nms_iou,
            seam_ios,
        )
        keep[seam_idx] = keep_seam
    removed = int(n - keep.sum())
    boxes = det["boxes"][keep]
    rings = boxes_to_rings(boxes, info.transform)  # the (model) grid's transform: exact
    # px_* are the FILE's pixels: model-grid pixels times native pixels per model pixel (gsd=)
    native_px = boxes * np.array([info.factor_x, info.factor_y] * 2, dtype=np.float64)
    keys = det["tile_key"][keep]
    ids = [TileId.from_key(k) for k in keys]
    labels = det["label"][keep]
    fields = {
        "score": det["score"][keep].astype(np.float64),
        "class_id": labels.astype(np.int64),
        "label": _label_names(labels, categories),
        "source": np.array([info.path] * len(keys), dtype=object),
        "tile_row": np.array([t.row for t in ids], dtype=np.int64),
        "tile_col": np.array([t.col for t in ids], dtype=np.int64),
        "tile_key": np.array(keys, dtype=object),
        "px_xmin": native_px[:, 0],
        "px_ymin": native_px[:, 1],
        "px_xmax": native_px[:, 2],
        "px_ymax": native_px[:, 3],
    }
    return rings, fields, removed


def _classifications_for_raster(
    run_dir: Path,
    info: RasterInfo,
    done_keys: set[str],
    categories: Sequence[str] | None,
    tile_size: int,
    overlap: int,
    topk: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rows: dict[str, list[tuple[int, int, float]]] = {}
    for shard in _shard_files(run_dir):
        for key, k, cid, score in _query(
            shard,
            "SELECT tile_key, k, class_id, score FROM classifications WHERE path = ?",
            (info.path,),
        ):
            if key in done_keys:
                rows.setdefault(key, []).append((k, cid, score))
    tiles = {
        t.id.key(): t for t in plan_tiles(info.path, info.height, info.width, tile_size, overlap)
    }
    keys = sorted(rows)
    k_max = min(topk, max((len(v) for v in rows.values()), default=topk))
    rings = np.array([tile_footprint_ring(tiles[k], info.transform) for k in keys]).reshape(
        -1, 5, 2
    )
    fields: dict[str, np.ndarray] = {
        "source": np.array([info.path] * len(keys), dtype=object),
        "tile_row": np.array([tiles[k].id.row for k in keys], dtype=np.int64),
        "tile_col": np.array([tiles[k].id.col for k in keys], dtype=np.int64),
        "tile_key": np.array(keys, dtype=object),
    }
    by_rank = [{k: (c, s) for k, c, s in rows[key]} for key in keys]
    for j in range(1, k_max + 1):
        entries = [ranked.get(j, (-1, float("nan"))) for ranked in by_rank]
        cids = np.array([c for c, _ in entries], dtype=np.int64)
        fields[f"class_id_{j}"] = cids
        fields[f"label_{j}"] = _label_names(cids, categories)
        fields[f"score_{j}"] = np.array([s for _, s in entries], dtype=np.float64)
    return rings, fields


def _label_names(class_ids: npt.NDArray[np.int64], categories: Sequence[str] | None) -> np.ndarray:
    """Label name of each class id; the id as text when the model has no name for it."""
    return np.array(
        [
            categories[i] if categories and 0 <= i < len(categories) else str(i)
            for i in class_ids.tolist()
        ],
        dtype=object,
    )
