"""Per-raster feature files: a raster's finished features, from the rank that made them to rank 0.

Rank 0 writes the layers from them. Why: the merge's costly part (reading a raster's
records, seam de-duplication, georeferencing) is independent per raster, so ranks finalise the
rasters assigned to them in parallel; rank 0 only gathers. A feature file is a
:class:`~mgpr.outputs.vector.FeatureBatch` as Parquet, published like a part (hidden temp name,
fsync, rename: :func:`~mgpr.outputs.parts.publish_file`):

* ``rings``: fixed-size list of 10 float64 per feature (the closed ring's 5 points, x y x y ...)
  for a rings (boxes) batch, or ``geometry``: WKB (binary) for a geometries batch (polygons);
* the batch's columns in order (float64, int64, bool, or UTF-8 string for text columns);
* schema metadata ``mgpr.features``: JSON with the raster's path and the task's counters
  (``duplicates_removed``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mgpr.outputs.parts import publish_file
from mgpr.outputs.vector import FeatureBatch

FEATURES_DIR = "merge"
META_KEY = b"mgpr.features"


def features_dir(run_dir: Path) -> Path:
    """Folder of a merge's per-raster feature files (removed once the layers are written)."""
    return run_dir / FEATURES_DIR


def feature_path(run_dir: Path, index: int) -> Path:
    """The feature file of the ``index``-th input raster (the run's raster order)."""
    return features_dir(run_dir) / f"raster{index:06d}.features.parquet"


def _column(values: np.ndarray) -> pa.Array:
    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    return pa.array(values)


def write_features(path: Path, batch: FeatureBatch, meta: Mapping[str, Any]) -> Path:
    """Publish one raster's features (see the module docstring)."""
    columns: dict[str, pa.Array]
    if batch.rings is not None:
        flat = pa.array(np.ascontiguousarray(batch.rings, np.float64).reshape(-1))
        columns = {"rings": pa.FixedSizeListArray.from_arrays(flat, 10)}
    else:
        import shapely

        wkb = shapely.to_wkb(batch.shapes()).tolist() if len(batch) else []
        columns = {"geometry": pa.array(wkb, pa.binary())}
    columns.update({name: _column(np.asarray(col)) for name, col in batch.fields.items()})
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(dict(meta)).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    return publish_file(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_features(path: Path) -> tuple[FeatureBatch, dict[str, Any]]:
    """A feature file back as a batch (text columns as object arrays) and its metadata."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    fields: dict[str, np.ndarray] = {}
    for name in table.column_names[1:]:
        column = table[name]
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            fields[name] = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
        else:
            fields[name] = column.to_numpy()
    if table.column_names[0] == "geometry":
        import shapely

        wkb = table["geometry"].to_numpy(zero_copy_only=False)
        return FeatureBatch.of_geometries(shapely.from_wkb(wkb), fields), meta
    rings = table["rings"].combine_chunks().flatten().to_numpy().reshape(-1, 5, 2)
    return FeatureBatch(rings.astype(np.float64, copy=False), fields), meta
