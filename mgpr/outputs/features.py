"""Feature files: rasters' finished features, from the rank that made them to rank 0.

Rank 0 writes the layers from them. Why: the merge's costly part (reading a raster's
records, seam de-duplication, georeferencing) is independent per raster, so ranks finalise the
rasters assigned to them in parallel; rank 0 only gathers. A feature file holds one raster
(:func:`feature_path`, :func:`write_features`) or a group of consecutive rasters of one rank's
share (:func:`group_path`, :func:`write_feature_group`: a folder of 20,000 chips is 20,000
files otherwise, and writing them cost half a rank's share). It is a
:class:`~mgpr.outputs.vector.FeatureBatch` as Parquet, published like a part (hidden temp name,
rename: :func:`~mgpr.outputs.parts.publish_file`) but without fsync (no later job reads it):

* ``rings``: fixed-size list of 10 float64 per feature (the closed ring's 5 points, x y x y ...)
  for a rings (boxes) batch, or ``geometry``: WKB (binary) for a geometries batch (polygons);
* the batch's columns in order (float64, int64, bool, UTF-8 string for text columns, or a
  fixed-size list of float32 for a (N, D) vector column such as an embedding);
* schema metadata ``mgpr.features``: JSON with the raster's path and the task's counters
  (``duplicates_removed``); for a group, ``rasters``: a list of those, each with its ``rows``
  (the group's rows are its rasters' rows in that order).

:func:`read_finalised` reads every file of the folder back, raster by raster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


def group_path(run_dir: Path, first_index: int) -> Path:
    """The feature file of a group whose first raster is the ``first_index``-th input.

    Unique: every raster is in one rank's share, and in one group of it.
    """
    return features_dir(run_dir) / f"group{first_index:06d}.features.parquet"


def _column(values: np.ndarray) -> pa.Array:
    if values.dtype == object:
        return pa.array(values.tolist(), pa.string())
    if values.ndim == 2:
        return vector_array(values)
    return pa.array(values)


def vector_array(values: np.ndarray) -> pa.Array:
    """A (N, D) float32 vector column as a fixed-size list of D float32 (D = 0: a plain list)."""
    flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), pa.float32())
    if values.shape[1] == 0:
        return pa.array([[] for _ in range(len(values))], pa.list_(pa.float32()))
    return pa.FixedSizeListArray.from_arrays(flat, int(values.shape[1]))


def vector_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list column of equal-length float32 lists back as (N, D) float32 (inverse of the above)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, flat.size // n if n else 0)


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
    # Not fsynced: no later job reads a feature file (every merge clears them first), and a
    # folder of 20,000 chips spent 60 % of its merge share in the two fsyncs per file.
    return publish_file(
        path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), durable=False
    )


def write_feature_group(
    path: Path, entries: Sequence[tuple[str, FeatureBatch, Mapping[str, Any]]]
) -> Path:
    """Publish the features of several rasters (``(path, batch, counters)`` each) as one file."""
    rasters = [{"path": p, "rows": len(b), **dict(meta)} for p, b, meta in entries]
    batch = FeatureBatch.concat([b for _p, b, _meta in entries])
    return write_features(path, batch, {"rasters": rasters})


def read_finalised(run_dir: Path) -> dict[str, tuple[FeatureBatch, dict[str, Any]]]:
    """Every raster the feature files of ``run_dir`` hold: path -> (batch, its counters)."""
    out: dict[str, tuple[FeatureBatch, dict[str, Any]]] = {}
    folder = features_dir(run_dir)
    for file in sorted(folder.glob("*.features.parquet")) if folder.is_dir() else []:
        batch, meta = read_features(file)
        if "rasters" not in meta:
            out[str(meta.get("path"))] = (batch, meta)
            continue
        start = 0
        for entry in meta["rasters"]:
            stop = start + int(entry["rows"])
            out[str(entry["path"])] = (batch.rows(start, stop), entry)
            start = stop
    return out


def read_features(path: Path) -> tuple[FeatureBatch, dict[str, Any]]:
    """A feature file back as a batch (text columns as object arrays) and its metadata."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    fields: dict[str, np.ndarray] = {}
    for name in table.column_names[1:]:
        column = table[name]
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            fields[name] = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
        elif pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
            fields[name] = vector_values(column)
        else:
            fields[name] = column.to_numpy()
    if table.column_names[0] == "geometry":
        import shapely

        wkb = table["geometry"].to_numpy(zero_copy_only=False)
        return FeatureBatch.of_geometries(shapely.from_wkb(wkb), fields), meta
    rings = table["rings"].combine_chunks().flatten().to_numpy().reshape(-1, 5, 2)
    return FeatureBatch(rings.astype(np.float64, copy=False), fields), meta
