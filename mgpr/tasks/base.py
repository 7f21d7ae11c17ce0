"""The Task seam: what a task's per-tile output is, how a rank stores it, how a run merges it.

A :class:`Task` object replaces every ``if task == ...`` of the pipeline:

* :attr:`Task.record_type`: the adapter output it accepts per tile (``Detections``,
  ``Classification``, ``ClassMap``); predict_step wraps each in a :class:`TileOutcome`;
* :meth:`Task.write_payload`: the per-rank part payload of a chunk of outcomes, published
  through a :class:`~mgpr.outputs.parts.PartSink` before the chunk's manifest. The vector tasks
  publish a records table (:meth:`VectorTask.records`, Parquet); a raster task (segmentation)
  overrides it to publish raster part files (GeoTIFFs of owned tile cores,
  :mod:`mgpr.outputs.cog`) with ``sink.publish(suffix, write)``;
* :meth:`Task.merge`: the run's merge, after the :class:`~mgpr.outputs.ledger.Ledger` proved
  exactly-once; the vector tasks turn each raster's records into a
  :class:`~mgpr.outputs.vector.FeatureBatch` (:meth:`VectorTask.features`) for the writers
  ``output_format`` selects, one layer per CRS (:mod:`mgpr.tasks.layers`).

Adding a task = one module here (a Task subclass) + its models, and one entry in
:mod:`mgpr.tasks` ``TASKS``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mgpr.conf.schema import PredictConfig
from mgpr.geo.raster import RasterInfo
from mgpr.geo.reproject import crs_wkt_of
from mgpr.geo.tiling import Tile
from mgpr.outputs.features import (
    feature_path,
    group_path,
    read_finalised,
    write_feature_group,
    write_features,
)
from mgpr.outputs.formats import vector_writers
from mgpr.outputs.ledger import Ledger
from mgpr.outputs.parts import RECORDS_SUFFIX, PartSink
from mgpr.outputs.parts_read import RecordsReader
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.layers import Layer, plan_layers, to_layer_crs

#: A rank's share of the merge publishes its rasters' features in groups of at most this many
#: rasters (:meth:`VectorTask.finalise`): one file each cost ~1 ms (a folder of 20,000 chips).
GROUP_RASTERS = 512
#: ... and a group is published once it holds this many features (memory: a group is held
#: once as its rasters' batches and once concatenated while it is written).
GROUP_ROWS = 250_000

#: Tile status codes (those of the data pipeline's samples, ``mgpr.data.dataset``).
STATUS_DONE = 0
STATUS_EMPTY = 1
STATUS_FAILED = 2


@dataclass(slots=True)
class TileOutcome:
    """What predict_step produced for one tile (the part writer's input).

    Attributes:
        tile: the tile.
        status: :data:`STATUS_DONE`, :data:`STATUS_EMPTY` (all nodata, model not run) or
            :data:`STATUS_FAILED`.
        reason: why it failed, else "".
        record: the adapter's output for the tile (the task's :attr:`Task.record_type`, in TILE
            pixel coordinates), None unless done.
    """

    tile: Tile
    status: int
    reason: str = ""
    record: Any = None


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a task needs to know of the run (the same on every rank).

    Attributes:
        rasters: header of every input raster by path.
        tile_size: pixels.
        overlap: pixels shared by neighbouring tiles (seam strips).
        categories: label names by class id, or None.
        nms_iou: detection de-duplication IoU threshold.
        seam_ios: detection de-duplication intersection-over-smaller threshold.
        topk: classes kept per tile (classification).
        probabilities: segmentation: also write per-class probabilities.
        seam: segmentation: ``crop`` or ``blend`` (:mod:`mgpr.geo.seams`).
        vectorize: segmentation: also write the class map as polygons.
        output_crs: the vector layers' one CRS as WKT (``output_crs``), or None: each
            raster's own CRS, one layer per CRS.
        simplify: traced outlines (instance masks, segments) simplified to within this many
            pixels of the grid they were traced on; 0 keeps the exact pixel edges.
    """

    rasters: Mapping[str, RasterInfo]
    tile_size: int
    overlap: int
    categories: Sequence[str] | None = None
    nms_iou: float = 0.5
    seam_ios: float = 0.5
    topk: int = 5
    probabilities: bool = False
    seam: str = "crop"
    vectorize: bool = False
    output_crs: str | None = None
    simplify: float = 0.0

    @classmethod
    def for_run(
        cls, cfg: PredictConfig, rasters: Sequence[RasterInfo], categories: Sequence[str] | None
    ) -> TaskContext:
        """The context of a run (the same on every rank, and at the merge)."""
        return cls(
            rasters={r.path: r for r in rasters},
            tile_size=cfg.tile_size,
            overlap=cfg.overlap,
            categories=categories,
            nms_iou=cfg.nms_iou,
            seam_ios=cfg.seam_ios,
            topk=cfg.topk,
            probabilities=cfg.probabilities,
            seam=cfg.seam,
            vectorize=cfg.vectorize,
            output_crs=crs_wkt_of(cfg.output_crs) if cfg.output_crs else None,
            simplify=float(cfg.simplify),
        )


@dataclass(slots=True)
class MergeResult:
    """What a merge wrote and the ledger's accounting."""

    output_path: Path | None = None
    output_paths: list[Path] = field(default_factory=list)
    #: input path -> the files written for it alone (segmentation's class maps); empty for
    #: tasks whose inputs share a layer
    outputs_by_input: dict[str, list[str]] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)  # layer name -> features
    records: int = 0
    tiles_planned: int = 0
    tiles_done: int = 0
    tiles_empty: int = 0
    tiles_failed: int = 0
    tiles_missing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (tile_key, reason)
    missing_path: Path | None = None
    duplicate_tiles: int = 0  # tile copies found in more than one part, dropped
    duplicates_removed: int = 0  # seam de-duplication (detection)
    #: detections found twice where input rasters overlap on the ground, removed
    duplicates_across_inputs: int = 0
    #: detection: predicted tiles holding as many boxes as the per-tile cap (``max_detections``):
    #: the model may have found more there, which the cap dropped
    tiles_at_box_cap: int = 0
    #: label -> what the outputs hold of it: ``{"count": features}`` for the vector tasks (a
    #: classifier: its tiles' top-1 label, :func:`tally_classes`); a class map's
    #: ``{"pixels", "area_m2" (ground m^2; not without a CRS), "polygons" (vectorize=true)}``
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    #: inputs whose every planned tile was nodata (skipped): usually a wrong nodata value or mask
    empty_rasters: list[str] = field(default_factory=list)
    #: raster path -> its merged features (vector tasks), for the run's previews: handed over
    #: in memory so that nothing re-opens the outputs (no SQLite lock in the run directory).
    features: dict[str, FeatureBatch] = field(default_factory=dict)


class Task(abc.ABC):
    """One kind of model output (see the module docstring)."""

    #: ``model.task`` value this task handles.
    name: ClassVar[str]
    #: The adapter's per-tile output type.
    record_type: ClassVar[type]
    #: Logged by rank 0 when ``overlap=0`` would hurt this task's results (None: no warning).
    overlap_warning: ClassVar[str | None] = None

    def check(self, outcome: TileOutcome) -> None:
        """Refuse a done tile whose record is not this task's output (an adapter bug)."""
        if outcome.status == STATUS_DONE and not isinstance(outcome.record, self.record_type):
            raise TypeError(
                f"task {self.name} expects {self.record_type.__name__} per tile, got "
                f"{type(outcome.record).__name__} for {outcome.tile.id.key()}"
            )

    @abc.abstractmethod
    def write_payload(
        self, outcomes: Sequence[TileOutcome], ctx: TaskContext, sink: PartSink
    ) -> dict[str, int]:
        """Publish a chunk's payload file(s) through ``sink``; returns records per tile key."""

    def finalise(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        paths: Sequence[str],
    ) -> Mapping[str, FeatureBatch]:
        """One rank's share of the merge: finish the rasters ``paths`` (run on every rank).

        What it publishes is the task's business; :meth:`merge` on rank 0 then uses it where
        present and does the rest itself. Returns the features it published by raster (the
        rank's previews draw them); none for a task that publishes rasters. The default does
        nothing (rank 0 does everything).
        """
        return {}

    @abc.abstractmethod
    def merge(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        output_format: str,
        output_name: str,
        use_finalised: bool = False,
    ) -> MergeResult:
        """Write the run's outputs from the ledger's picks (records of done tiles only).

        ``use_finalised``: take what :meth:`finalise` published for a raster (by any rank)
        instead of finishing that raster again.
        """


class VectorTask(Task):
    """A task whose output is polygon features: records tables in, vector layers out."""

    #: Layer name of a single-CRS run (``detections``, ``classifications``).
    layer_base: ClassVar[str]
    #: Schema of the per-rank records table (with ``tile_key`` and ``path`` columns).
    records_schema: ClassVar[pa.Schema]

    @abc.abstractmethod
    def records(self, outcomes: Sequence[TileOutcome], ctx: TaskContext) -> pa.Table:
        """The records of the done tiles among ``outcomes`` (:attr:`records_schema`)."""

    @abc.abstractmethod
    def features(
        self, info: RasterInfo, records: pa.Table, ctx: TaskContext, tiles: Mapping[str, Tile]
    ) -> tuple[FeatureBatch, int]:
        """One raster's features from its records; returns ``(batch, duplicates removed)``."""

    def across_inputs(
        self, batches: list[FeatureBatch], rasters: list[RasterInfo], layer: Layer, ctx: TaskContext
    ) -> tuple[list[FeatureBatch], int]:
        """One layer's batches (layer CRS) after any pass between its rasters; removed count.

        The default passes them through (a classified tile is the tile, whoever else saw it).
        """
        return batches, 0

    def write_payload(
        self, outcomes: Sequence[TileOutcome], ctx: TaskContext, sink: PartSink
    ) -> dict[str, int]:
        """A records table (only when the chunk has records); its rows counted per tile."""
        for outcome in outcomes:
            self.check(outcome)
        table = self.records(outcomes, ctx)
        if table.num_rows == 0:
            return {}
        sink.publish_table(table, RECORDS_SUFFIX)
        counts = pc.value_counts(table["tile_key"])
        return {
            str(k): int(n)
            for k, n in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            )
        }

    def raster_features(
        self, run_dir: Path, ledger: Ledger, ctx: TaskContext, tiles: Mapping[str, Tile]
    ) -> RasterFeatures:
        """Each raster's features from its done tiles' records, for one merge or share."""
        return RasterFeatures(self, run_dir, ledger, ctx, tiles)

    def finalise(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        paths: Sequence[str],
    ) -> Mapping[str, FeatureBatch]:
        """Publish the features of the rasters ``paths`` (:mod:`mgpr.outputs.features`).

        In groups of consecutive rasters, each published once it holds
        :data:`GROUP_RASTERS` rasters or :data:`GROUP_ROWS` features (which bounds what a group
        holds in memory twice); a group of one raster is its raster's own file.
        """
        index = {p: i for i, p in enumerate(ctx.rasters)}
        features_of = self.raster_features(run_dir, ledger, ctx, tiles)
        done: dict[str, FeatureBatch] = {}
        group: list[tuple[str, FeatureBatch, dict[str, Any]]] = []

        def publish() -> None:
            if len(group) == 1:
                path, batch, meta = group[0]
                write_features(feature_path(run_dir, index[path]), batch, {"path": path, **meta})
            elif group:
                write_feature_group(group_path(run_dir, index[group[0][0]]), group)
            group.clear()

        rows = 0
        for path in paths:
            batch, removed = features_of(path)
            done[path] = batch
            group.append((path, batch, {"duplicates_removed": removed}))
            rows += len(batch)
            if len(group) >= GROUP_RASTERS or rows >= GROUP_ROWS:
                publish()
                rows = 0
        publish()
        return done

    def merge(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        output_format: str,
        output_name: str,
        use_finalised: bool = False,
    ) -> MergeResult:
        """Each raster's features, one layer per CRS, every selected writer.

        A raster's features come from the published feature files when ``use_finalised`` and
        one holds it (another rank finished it), else they are made here. Rasters in different
        CRSs go to different layers (every feature stays in its own raster's CRS), unless
        ``ctx.output_crs``: one layer in it, features reprojected as they are written (the
        previews get them in the raster's CRS). Writers publish whole files only.
        """
        result = MergeResult()
        rasters = list(ctx.rasters.values())
        writers = vector_writers(output_format, run_dir, output_name)
        finalised = read_finalised(run_dir) if use_finalised else {}
        features_of = self.raster_features(run_dir, ledger, ctx, tiles)
        try:
            for layer in plan_layers(rasters, self.layer_base, ctx.output_crs):
                batches = []
                for path in layer.paths:
                    if path in finalised:
                        batch, meta = finalised.pop(path)
                        removed = int(meta.get("duplicates_removed", 0))
                    else:
                        batch, removed = features_of(path)
                    batches.append(to_layer_crs(batch, ctx.rasters[path], layer))
                    result.features[path] = batch
                    result.duplicates_removed += removed
                infos = [ctx.rasters[p] for p in layer.paths]
                batches, across = self.across_inputs(batches, infos, layer, ctx)
                result.duplicates_across_inputs += across
                merged = FeatureBatch.concat(batches)
                tally_classes(result.classes, merged)
                for writer in writers:
                    writer.write(layer.name, layer.crs_wkt, merged)
                result.layers[layer.name] = len(merged)
                result.records += len(merged)
            if rasters:
                for writer in writers:
                    result.output_paths += writer.commit()
        finally:
            for writer in writers:
                writer.abort()
        result.output_path = result.output_paths[0] if result.output_paths else None
        return result


class RasterFeatures:
    """Each raster's features for one merge or share, from the records of its done tiles.

    Holds what the rasters share: the records reader (each part read once,
    :class:`~mgpr.outputs.parts_read.RecordsReader`), the planned keys by raster, and the
    features of a raster without records, made once (they hold no row of any raster, and a
    folder of chips is mostly empty chips: ``features`` of none took ~150 us a raster).
    """

    def __init__(
        self,
        task: VectorTask,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
    ) -> None:
        self._task = task
        self._ledger = ledger
        self._ctx = ctx
        self._tiles = tiles
        self._reader = RecordsReader(run_dir, ledger.parts, RECORDS_SUFFIX, task.records_schema)
        self._keys = _keys_by_path(tiles)
        self._empty: FeatureBatch | None = None

    def __call__(self, path: str) -> tuple[FeatureBatch, int]:
        """``path``'s features and the seam duplicates its features removed."""
        table = self._reader.read(self._ledger.picks(self._keys.get(path, [])))
        info = self._ctx.rasters[path]
        if table.num_rows:
            return self._task.features(info, table, self._ctx, self._tiles)
        if self._empty is None:
            self._empty = self._task.features(info, table, self._ctx, self._tiles)[0]
        return self._empty, 0


def tally_classes(
    totals: dict[str, dict[str, float]], batch: FeatureBatch, count_key: str = "count"
) -> None:
    """Add one written batch to ``totals``: features per label, as ``totals[label][count_key]``.

    The label is ``label`` (detections, segments) or a classifier's top-1 ``label_1``.
    Detections are counted only (boxes overlap and outline objects); a class map's pixels and
    ground area come from its tiles (:mod:`mgpr.tasks.segmentation_classes`), and its
    ``vectorize=true`` polygons add their count as ``polygons``.
    """
    labels = batch.fields.get("label", batch.fields.get("label_1"))
    if labels is None or not len(labels):
        return
    ids = batch.fields.get("class_id", batch.fields.get("class_id_1"))
    if ids is not None:  # ints sort ~9x faster than strings: 1M boxes in ~60 ms
        _ids, first, counts = np.unique(np.asarray(ids), return_index=True, return_counts=True)
        names = [str(n) for n in np.asarray(labels)[first]]
    else:
        unique, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
        names = unique.tolist()
    for i, name in enumerate(names):
        entry = totals.setdefault(name, {})
        entry[count_key] = entry.get(count_key, 0) + int(counts[i])


def _keys_by_path(tiles: Mapping[str, Tile]) -> dict[str, list[str]]:
    """Planned tile keys of each raster, in plan order."""
    out: dict[str, list[str]] = {}
    for key, tile in tiles.items():
        out.setdefault(tile.id.path, []).append(key)
    return out


def tile_footprints(
    info: RasterInfo, keys: Sequence[str], tiles: Mapping[str, Tile]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The per-tile tasks' features: each tile's footprint ring and its identifying columns.

    Returns ``(rings, fields)``: (N, 5, 2) footprints inside the raster
    (:func:`~mgpr.geo.georef.tile_footprint_ring`, map units) and ``source``, ``tile_row``,
    ``tile_col``, ``tile_key`` for the tiles ``keys``, in that order (classification and
    embedding add their own columns).
    """
    from mgpr.geo.georef import tile_footprint_ring

    rings = np.array(
        [tile_footprint_ring(tiles[k], info.transform) for k in keys], dtype=np.float64
    ).reshape(-1, 5, 2)
    fields: dict[str, np.ndarray] = {
        "source": np.array([info.path] * len(keys), dtype=object),
        "tile_row": np.array([tiles[k].id.row for k in keys], dtype=np.int64),
        "tile_col": np.array([tiles[k].id.col for k in keys], dtype=np.int64),
        "tile_key": np.array(keys, dtype=object),
    }
    return rings, fields


def label_names(class_ids: np.ndarray, categories: Sequence[str] | None) -> np.ndarray:
    """Label name of each class id; the id as text when the model has no name for it."""
    return np.array(
        [
            categories[i] if categories and 0 <= i < len(categories) else str(i)
            for i in np.asarray(class_ids).tolist()
        ],
        dtype=object,
    )
