"""Embedding: one feature vector per tile -> one polygon per tile (its footprint) with the vector.

Per-rank records (:data:`RECORDS_SCHEMA`): one row per done tile, its ``embedding`` as a list
of float32 (the model's D features, the same D for every tile of a run). Merge, per raster:
each done tile becomes its footprint inside the raster
(:func:`~mgpr.geo.georef.tile_footprint_ring`, as a classified tile) with ``source``,
``tile_row``, ``tile_col``, ``tile_key`` and ``embedding``, a (N, D) float32 column of the
:class:`~mgpr.outputs.vector.FeatureBatch`: GeoParquet stores it as a fixed-size list of D
float32, GeoPackage as a BLOB of D little-endian float32 per feature (README "Embeddings").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile
from mgpr.models.base import Embedding
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import STATUS_DONE, TaskContext, TileOutcome, VectorTask, tile_footprints

RECORDS_SCHEMA = pa.schema(
    [
        ("tile_key", pa.string()),
        ("path", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


class EmbeddingTask(VectorTask):
    """A feature vector per tile (``Embedding``) -> layer ``embeddings``."""

    name = "embedding"
    record_type = Embedding
    layer_base = "embeddings"
    records_schema: ClassVar[pa.Schema] = RECORDS_SCHEMA

    def records(self, outcomes: Sequence[TileOutcome], ctx: TaskContext) -> pa.Table:
        """One row per done tile: its key, raster and vector (a list of float32)."""
        done = [o for o in outcomes if o.status == STATUS_DONE and o.record is not None]
        vectors = [np.asarray(o.record.vector, np.float32) for o in done]
        offsets = np.zeros(len(vectors) + 1, np.int32)
        np.cumsum([len(v) for v in vectors], out=offsets[1:])
        flat = np.concatenate(vectors) if vectors else np.zeros(0, np.float32)
        return pa.table(
            {
                "tile_key": pa.array([o.tile.id.key() for o in done], pa.string()),
                "path": pa.array([o.tile.id.path for o in done], pa.string()),
                "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            },
            schema=RECORDS_SCHEMA,
        )

    def features(
        self, info: RasterInfo, records: pa.Table, ctx: TaskContext, tiles: Mapping[str, Tile]
    ) -> tuple[FeatureBatch, int]:
        """One footprint polygon per done tile with its (D,) vector, in tile-key order.

        Raises:
            ValueError: the tiles' vectors differ in length (parts of two models; the run's
                fingerprint refuses a resume with another model, so never in practice).
        """
        records = records.sort_by("tile_key")
        keys = [str(k) for k in records["tile_key"].to_pylist()]
        column = records["embedding"].combine_chunks()
        lengths = pc.unique(pc.list_value_length(column)).to_pylist()
        if len(lengths) > 1:
            raise ValueError(
                f"the embeddings of {info.path} have {sorted(lengths)} features per tile; one "
                "run's tiles must all have the same length (re-run with overwrite=true)"
            )
        dim = int(lengths[0]) if lengths else 0
        vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        rings, fields = tile_footprints(info, keys, tiles)
        fields["embedding"] = vectors.reshape(len(keys), dim)
        return FeatureBatch(rings, fields), 0
