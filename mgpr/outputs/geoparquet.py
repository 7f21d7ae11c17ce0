"""GeoParquet 1.1 output: one ``<layer>.parquet`` per layer, streamed in row groups.

For large runs (10^6+ detections) a GeoPackage is slow to build and needs locks; a Parquet file
is written front to back by one process, so it goes straight into the run directory under a
hidden temporary name (``.tmp-<pid>-<layer>.parquet``), is fsynced, and is ``os.replace``d onto
its final name at :meth:`GeoParquetWriter.commit`: readers see the whole file or none, and no
node-local detour is needed.

File layout (https://geoparquet.org/releases/v1.1.0/):

* ``geometry``: WKB polygons (Arrow ``binary``): box rings, or a geometries batch's Polygons /
  MultiPolygons (holes kept); x then y in the layer's CRS, exterior rings counter-clockwise and
  holes clockwise (declared as ``orientation``).
* ``bbox``: struct ``xmin, ymin, xmax, ymax`` (float64), each row's geometry bounds, declared as
  the ``covering`` of ``geometry``, so readers can skip row groups by their min/max statistics.
* the FeatureBatch's columns, in order: float64, int64, bool or UTF-8 string, and a (N, D)
  vector column (an embedding) as ``fixed_size_list<float32>[D]``.
* file metadata ``geo``: ``version`` 1.1.0, ``primary_column`` ``geometry``, and for
  ``geometry``: ``encoding`` WKB, ``geometry_types`` (the types the file holds: ``["Polygon"]``
  for boxes and for a layer without rows, ``["MultiPolygon", "Polygon"]`` when both occur),
  ``crs`` as PROJJSON
  (``null`` for a raster without CRS: the spec reads a *missing* ``crs`` as OGC:CRS84, which
  pixel coordinates are not), ``bbox`` of the whole file (absent for an empty layer).

Memory stays flat: rows are buffered only until a row group is full (:data:`ROW_GROUP_ROWS`),
then written; the ``geo`` metadata, which needs the whole file's bbox, is added at close.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mgpr.outputs.features import vector_array
from mgpr.outputs.parts import fsync_dir
from mgpr.outputs.vector import FeatureBatch, VectorWriter, counterclockwise

#: Rows per row group (GDAL's Parquet driver default): large enough for good compression and
#: few footer entries, small enough (~10 MB of detections) to buffer and to skip by statistics.
ROW_GROUP_ROWS = 65_536
GEOPARQUET_VERSION = "1.1.0"
_LAYER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_BBOX_TYPE = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


def geo_metadata(
    crs_wkt: str | None, bbox: list[float] | None, geometry_types: Sequence[str] = ("Polygon",)
) -> dict[str, Any]:
    """The ``geo`` file metadata of one layer (GeoParquet 1.1.0).

    Args:
        crs_wkt: the layer's CRS as WKT (or any input pyproj reads); None = no CRS (written as
            ``"crs": null``).
        bbox: ``[xmin, ymin, xmax, ymax]`` of every geometry in the file, layer CRS; None when
            the file holds no rows.
        geometry_types: the geometry types in the file (written sorted, each once).
    """
    import pyproj

    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted(set(geometry_types)),
        "crs": pyproj.CRS.from_user_input(crs_wkt).to_json_dict() if crs_wkt else None,
        "orientation": "counterclockwise",
        "edges": "planar",
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {"geometry": column},
    }


def _arrow_type(name: str, column: np.ndarray) -> pa.DataType:
    kind = np.asarray(column).dtype.kind
    if np.ndim(column) == 2:  # a vector per feature (embedding): fixed-size list of float32
        dim = int(np.shape(column)[1])
        return pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())
    if kind == "f":
        return pa.float64()
    if kind in "iu":
        return pa.int64()
    if kind == "b":
        return pa.bool_()
    if kind in "OUS":
        return pa.string()
    raise ValueError(f"FeatureBatch column {name!r} has dtype {column.dtype}, not float/int/str")


def batch_table(batch: FeatureBatch, schema: pa.Schema | None = None) -> pa.Table:
    """One Arrow table of ``batch``: geometry (WKB), bbox struct, then the batch's columns.

    Args:
        batch: the features; exterior rings are made counter-clockwise (holes clockwise).
        schema: the layer's schema when already known (later batches must match it).
    """
    import shapely

    n = len(batch)
    if batch.rings is not None:  # boxes: orient and bound the plain arrays, no objects kept
        rings = counterclockwise(np.asarray(batch.rings, dtype=np.float64))
        wkb = shapely.to_wkb(shapely.polygons(rings)) if n else np.empty(0, dtype=object)
        lo, hi = rings.min(axis=1), rings.max(axis=1)  # (N, 2) each: x, y
        xmin, ymin, xmax, ymax = lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]
    else:
        geoms = shapely.orient_polygons(batch.shapes(), exterior_cw=False)
        wkb = shapely.to_wkb(geoms) if n else np.empty(0, dtype=object)
        xmin, ymin, xmax, ymax = batch.bounds().T
    bbox = pa.StructArray.from_arrays(
        [pa.array(v, pa.float64()) for v in (xmin, ymin, xmax, ymax)],
        fields=list(_BBOX_TYPE),
    )
    names = list(batch.fields)
    types = [_arrow_type(k, np.asarray(batch.fields[k])) for k in names]
    arrays = [pa.array(wkb, pa.binary()), bbox] + [
        vector_array(np.asarray(batch.fields[k]))
        if np.ndim(batch.fields[k]) == 2
        else pa.array(np.asarray(batch.fields[k]), t)
        for k, t in zip(names, types, strict=True)
    ]
    own = pa.schema(
        [pa.field("geometry", pa.binary()), pa.field("bbox", _BBOX_TYPE)]
        + [pa.field(k, t) for k, t in zip(names, types, strict=True)]
    )
    if schema is not None and not own.equals(schema):
        raise ValueError(
            f"FeatureBatch columns {own.names[2:]} do not match the layer's {schema.names[2:]}"
        )
    return pa.Table.from_arrays(arrays, schema=own if schema is None else schema)


@dataclass
class _Layer:
    """One layer's open file: its temp path, the Parquet writer and the rows not yet written."""

    crs_wkt: str | None
    schema: pa.Schema
    tmp: Path
    final: Path
    writer: pq.ParquetWriter
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    rows: int = 0
    row_groups: int = 0
    bounds: list[float] | None = None  # xmin, ymin, xmax, ymax so far
    types: set[str] = field(default_factory=set)  # geometry types written so far


class GeoParquetWriter(VectorWriter):
    """Each layer to ``<run_dir>/<layer>.parquet`` (GeoParquet 1.1, WKB polygons, bbox covering).

    Takes either form of :class:`~mgpr.outputs.vector.FeatureBatch` (box rings or geometries),
    even mixed within a layer; the ``geo`` metadata lists the geometry types actually written.

    Args:
        run_dir: the run directory.
        stem: unused (files are named after their layers); kept for the writer seam.
        row_group_rows: rows per row group; every row group but a file's last has exactly this
            many rows.
    """

    format_name = "parquet"

    def __init__(self, run_dir: Path, stem: str, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        super().__init__(run_dir, stem)
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows={row_group_rows} must be >= 1")
        self.row_group_rows = row_group_rows
        self._layers: dict[str, _Layer] = {}

    def final_path(self, layer: str) -> Path:
        """Where ``layer``'s file appears after :meth:`commit`."""
        return self.run_dir / f"{layer}.parquet"

    def write(self, layer: str, crs_wkt: str | None, batch: FeatureBatch) -> None:
        """Append ``batch`` to ``layer``; full row groups go to disk, the rest waits."""
        state = self._layers.get(layer)
        if state is None:
            table = batch_table(batch)
            state = self._open(layer, crs_wkt, table.schema)
        else:
            if crs_wkt != state.crs_wkt:
                raise ValueError(f"layer {layer!r} was started in another CRS than this batch's")
            table = batch_table(batch, state.schema)
        state.types.update(batch.geometry_types() if len(batch) else ())
        if len(table):
            state.pending.append(table)
            state.pending_rows += len(table)
            self._grow_bounds(state, table)
        if state.pending_rows >= self.row_group_rows:
            self._flush(state, final=False)

    def _open(self, layer: str, crs_wkt: str | None, schema: pa.Schema) -> _Layer:
        if not _LAYER_RE.match(layer):
            raise ValueError(f"layer name {layer!r} is not a plain file name")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".tmp-{os.getpid()}-{layer}.parquet"
        # store_schema=False: no ARROW:schema copy of the schema (written at open, before the
        # ``geo`` metadata exists); Arrow readers (GeoPandas) then take the schema's metadata,
        # ``geo`` included, from the file's key-value metadata. Every column type round-trips.
        writer = pq.ParquetWriter(
            tmp, schema, compression="zstd", write_statistics=True, store_schema=False
        )
        state = _Layer(crs_wkt, schema, tmp, self.final_path(layer), writer)
        self._layers[layer] = state
        return state

    @staticmethod
    def _grow_bounds(state: _Layer, table: pa.Table) -> None:
        bbox = table.column("bbox").combine_chunks()
        box = [
            float(np.min(bbox.field("xmin"))),
            float(np.min(bbox.field("ymin"))),
            float(np.max(bbox.field("xmax"))),
            float(np.max(bbox.field("ymax"))),
        ]
        old = state.bounds
        state.bounds = (
            box if old is None else [*map(min, old[:2], box[:2]), *map(max, old[2:], box[2:])]
        )

    def _flush(self, state: _Layer, final: bool) -> None:
        """Write whole row groups from the pending rows (and, if ``final``, the remainder)."""
        if not state.pending:
            return
        table = pa.concat_tables(state.pending)
        full = (len(table) // self.row_group_rows) * self.row_group_rows
        cut = len(table) if final else full
        if cut:
            head = table.slice(0, cut)
            state.writer.write_table(head, row_group_size=self.row_group_rows)
            state.row_groups += -(-cut // self.row_group_rows)
            state.rows += cut
        rest = table.slice(cut)
        state.pending = [rest] if len(rest) else []
        state.pending_rows = len(rest)

    def commit(self) -> list[Path]:
        """Finish every layer's file (last row group, ``geo`` metadata), fsync, rename."""
        paths: list[Path] = []
        try:
            for state in self._layers.values():
                self._flush(state, final=True)
                meta = geo_metadata(state.crs_wkt, state.bounds, sorted(state.types) or ["Polygon"])
                state.writer.add_key_value_metadata({"geo": json.dumps(meta)})
                state.writer.close()
                with open(state.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(state.tmp, state.final)
                paths.append(state.final)
            fsync_dir(self.run_dir)
        finally:
            self.abort()
        return paths

    def abort(self) -> None:
        """Close and delete every temporary file; published files stay."""
        for state in self._layers.values():
            try:
                state.writer.close()
            except Exception:  # noqa: BLE001 - already failing or closed; the file goes anyway
                pass
            state.tmp.unlink(missing_ok=True)
        self._layers.clear()
