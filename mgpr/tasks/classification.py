"""Classification: the top-k classes per tile -> one polygon per tile (its valid footprint).

Per-rank records (:data:`RECORDS_SCHEMA`): one row per (tile, rank ``k`` of the class, 1 = best).
Merge, per raster: each done tile becomes its footprint inside the raster
(:func:`~mgpr.geo.georef.tile_footprint_ring`) with ``class_id_<k>``, ``label_<k>`` and
``score_<k>`` for k = 1..``topk``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa

from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile
from mgpr.models.base import Classification
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import (
    STATUS_DONE,
    TaskContext,
    TileOutcome,
    VectorTask,
    label_names,
    tile_footprints,
)

RECORDS_SCHEMA = pa.schema(
    [
        ("tile_key", pa.string()),
        ("path", pa.string()),
        ("k", pa.int64()),
        ("class_id", pa.int64()),
        ("score", pa.float64()),
    ]
)


class ClassificationTask(VectorTask):
    """Top-k classes per tile (``Classification``) -> layer ``classifications``."""

    name = "classification"
    record_type = Classification
    layer_base = "classifications"
    records_schema: ClassVar[pa.Schema] = RECORDS_SCHEMA

    def records(self, outcomes: Sequence[TileOutcome], ctx: TaskContext) -> pa.Table:
        """One row per (done tile, class rank)."""
        keys: list[str] = []
        paths: list[str] = []
        ks: list[int] = []
        class_ids: list[int] = []
        scores: list[float] = []
        for out in outcomes:
            if out.status != STATUS_DONE or out.record is None:
                continue
            rec: Classification = out.record
            n = len(rec.class_ids)
            keys += [out.tile.id.key()] * n
            paths += [out.tile.id.path] * n
            ks += range(1, n + 1)
            class_ids += np.asarray(rec.class_ids, np.int64).tolist()
            scores += np.asarray(rec.scores, np.float64).tolist()
        return pa.table(
            {"tile_key": keys, "path": paths, "k": ks, "class_id": class_ids, "score": scores},
            schema=RECORDS_SCHEMA,
        )

    def features(
        self, info: RasterInfo, records: pa.Table, ctx: TaskContext, tiles: Mapping[str, Tile]
    ) -> tuple[FeatureBatch, int]:
        """One footprint polygon per done tile, its top-k classes as columns."""
        rows: dict[str, dict[int, tuple[int, float]]] = {}
        for key, k, cid, score in zip(
            records["tile_key"].to_pylist(),
            records["k"].to_pylist(),
            records["class_id"].to_pylist(),
            records["score"].to_pylist(),
            strict=True,
        ):
            rows.setdefault(key, {})[k] = (cid, score)
        keys = sorted(rows)
        k_max = min(ctx.topk, max((len(v) for v in rows.values()), default=ctx.topk))
        rings, fields = tile_footprints(info, keys, tiles)
        for j in range(1, k_max + 1):
            entries = [rows[key].get(j, (-1, float("nan"))) for key in keys]
            cids = np.array([c for c, _ in entries], dtype=np.int64)
            fields[f"class_id_{j}"] = cids
            fields[f"label_{j}"] = label_names(cids, ctx.categories)
            fields[f"score_{j}"] = np.array([s for _, s in entries], dtype=np.float64)
        return FeatureBatch(rings, fields), 0
