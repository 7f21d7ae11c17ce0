"""Read a GeoParquet file the way the 1.1.0 spec says, checking every rule it sets on the way.

The bundled GDAL of pyogrio has no Parquet driver, so the tests cannot read the files back with
OGR; this reader uses pyarrow + shapely + pyproj only (not the writer's code) and asserts the
spec's MUSTs (https://geoparquet.org/releases/v1.1.0/, its schema.json), plus the promises mgpr
makes on top: one Polygon per row (or the geometry types the caller expects: segmentation
polygons), counter-clockwise exteriors and clockwise holes, bbox = geometry bounds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import shapely

_TYPE_RE = re.compile(r"^(GeometryCollection|(Multi)?(Point|LineString|Polygon))( Z)?$")


def read_geoparquet(
    path: Path, geometry_types: tuple[str, ...] = ("Polygon",)
) -> tuple[list[shapely.Geometry], pa.Table, pyproj.CRS | None, dict[str, Any]]:
    """Geometries, the attribute table (no geometry/bbox), the CRS (None = null) and ``geo``.

    ``geometry_types``: what ``geometry_types`` must say (sorted), boxes: ``("Polygon",)``.
    """
    pf = pq.ParquetFile(path)
    raw = pf.metadata.metadata or {}
    assert b"geo" in raw, "no 'geo' key in the Parquet file metadata"
    geo = json.loads(raw[b"geo"].decode("utf-8"))
    # Arrow readers (GeoPandas' read_parquet) look for it in the Arrow schema's metadata.
    assert (pq.read_schema(path).metadata or {}).get(b"geo") == raw[b"geo"]
    # File metadata (schema.json: required, version const, primary_column, columns).
    assert geo["version"] == "1.1.0"
    assert isinstance(geo["primary_column"], str) and geo["primary_column"]
    assert geo["primary_column"] in geo["columns"] and len(geo["columns"]) >= 1
    name = geo["primary_column"]
    col = geo["columns"][name]
    assert col["encoding"] == "WKB"
    types = col["geometry_types"]
    assert len(set(types)) == len(types) and all(_TYPE_RE.match(t) for t in types)
    assert types == sorted(types) == list(geometry_types)
    assert col.get("edges", "planar") in ("planar", "spherical")
    assert col.get("orientation", "counterclockwise") == "counterclockwise"
    assert "crs" in col, "a missing crs means OGC:CRS84; mgpr always writes it (or null)"
    crs = None if col["crs"] is None else pyproj.CRS.from_json_dict(col["crs"])
    # Geometry column: BYTE_ARRAY at the root, not repeated.
    schema = pf.schema_arrow
    index = schema.get_field_index(name)
    assert index >= 0 and schema.field(name).type in (pa.binary(), pa.large_binary())
    parquet_col = pf.schema.column(pf.schema.names.index(name))
    assert parquet_col.physical_type == "BYTE_ARRAY" and parquet_col.max_repetition_level == 0
    # Bbox covering: four paths into one root struct of xmin, ymin, xmax, ymax (one float type).
    cover = col["covering"]["bbox"]
    assert {k: v[1] for k, v in cover.items()} == {k: k for k in ("xmin", "ymin", "xmax", "ymax")}
    (bbox_name,) = {v[0] for v in cover.values()}
    bbox_type = schema.field(bbox_name).type
    assert pa.types.is_struct(bbox_type)
    assert [f.name for f in bbox_type] == ["xmin", "ymin", "xmax", "ymax"]
    assert len({f.type for f in bbox_type}) == 1 and bbox_type[0].type in (
        pa.float32(),
        pa.float64(),
    )
    table = pf.read()
    assert table.column(name).null_count == 0 and table.column(bbox_name).null_count == 0
    geoms = list(shapely.from_wkb(table.column(name).to_numpy(zero_copy_only=False)))
    if geoms:  # the declared types are exactly those present
        assert sorted({g.geom_type for g in geoms}) == types
    for geom in geoms:
        for poly in getattr(geom, "geoms", [geom]):
            assert shapely.is_ccw(poly.exterior)
            assert not any(shapely.is_ccw(hole) for hole in poly.interiors)
    bbox = table.column(bbox_name).combine_chunks()
    per_row = np.stack([bbox.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")], 1)
    np.testing.assert_array_equal(per_row, shapely.bounds(geoms).reshape(-1, 4))
    if geoms:
        whole = [*per_row[:, :2].min(axis=0), *per_row[:, 2:].max(axis=0)]
        assert col["bbox"] == whole
    else:
        assert "bbox" not in col
    return geoms, table.drop_columns([name, bbox_name]), crs, geo
