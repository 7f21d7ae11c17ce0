"""GeoParquet writer: row groups as batches arrive, spec metadata, bbox covering, atomic publish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely
from geoparquet_helpers import read_geoparquet
from test_vector_writers import WKT_32633

from mgpr.outputs.formats import vector_writers
from mgpr.outputs.geoparquet import GeoParquetWriter, counterclockwise
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import FeatureBatch


def _boxes(n: int, start: int = 0, label: str = "tree") -> FeatureBatch:
    """``n`` detections like the merge's: UTM-sized boxes with every detection column."""
    i = np.arange(start, start + n, dtype=np.float64)
    x0, y0 = 500_000.0 + 3.0 * i, 5_800_000.0 - 2.0 * i
    x1, y1 = x0 + 1.5 + 0.01 * i, y0 + 0.75
    rings = np.stack([np.stack([x0, x1, x1, x0, x0], 1), np.stack([y0, y0, y1, y1, y0], 1)], axis=2)
    return FeatureBatch(
        rings,
        {
            "score": np.linspace(0.1, 0.9, n),
            "class_id": (i % 3).astype(np.int64),
            "label": np.array([label] * n, dtype=object),
            "tile_key": np.array([f"o.tif:{int(k)}" for k in i], dtype=object),
        },
    )


def _row_groups(path: Path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_batches_stream_into_full_row_groups_and_appear_only_at_commit(tmp_path: Path) -> None:
    writer = GeoParquetWriter(tmp_path, "predictions", row_group_rows=4)
    writer.write("detections", WKT_32633, _boxes(3))
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".tmp-") and tmp.stat().st_size < 100  # 3 rows wait in memory
    writer.write("detections", WKT_32633, _boxes(6, start=3))  # 9 rows: two groups go to disk
    assert tmp.stat().st_size > 1000 and list(tmp_path.iterdir()) == [tmp]
    writer.write("detections", WKT_32633, _boxes(2, start=9))
    assert writer.commit() == [tmp_path / "detections.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["detections.parquet"]
    path = tmp_path / "detections.parquet"
    assert _row_groups(path) == [4, 4, 3]
    pf = pq.ParquetFile(path)
    columns = pf.metadata.row_group(0)
    assert all(columns.column(j).compression == "ZSTD" for j in range(columns.num_columns))
    geoms, table, crs, _ = read_geoparquet(path)
    assert len(geoms) == 11 and crs is not None and crs.to_epsg() == 32633
    assert table.column_names == ["score", "class_id", "label", "tile_key"]
    assert table.column("tile_key").to_pylist() == [f"o.tif:{k}" for k in range(11)]
    assert str(table.schema.field("class_id").type) == "int64"
    expected = FeatureBatch.concat([_boxes(3), _boxes(6, 3), _boxes(2, 9)]).rings
    assert shapely.equals(geoms, shapely.polygons(expected)).all()


def test_geo_metadata_is_geoparquet_1_1_with_projjson_crs_and_bbox(tmp_path: Path) -> None:
    writer = GeoParquetWriter(tmp_path, "predictions")
    batch = _boxes(5)
    writer.write("detections", WKT_32633, batch)
    (path,) = writer.commit()
    _, _, crs, geo = read_geoparquet(path)
    column = geo["columns"]["geometry"]
    assert crs == pyproj.CRS.from_wkt(WKT_32633)
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 32633}
    rings = batch.rings
    assert column["bbox"] == [
        rings[..., 0].min(),
        rings[..., 1].min(),
        rings[..., 0].max(),
        rings[..., 1].max(),
    ]
    assert column["covering"] == {
        "bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}
    }
    # Statistics on the bbox columns are what lets a reader skip row groups.
    stats = pq.ParquetFile(path).metadata.row_group(0).column(1).statistics
    assert stats is not None and stats.min == rings[..., 0].min()


def test_bbox_is_each_rings_bounds_also_for_rotated_rings(tmp_path: Path) -> None:
    """A rotated raster gives parallelograms: the bbox is the ring's bounds, not two corners."""
    rings = np.array(
        [
            [[0.0, 0.0], [2.0, 1.0], [1.0, 3.0], [-1.0, 2.0], [0.0, 0.0]],
            [[10.0, 5.0], [13.0, 6.0], [12.5, 9.0], [9.5, 8.0], [10.0, 5.0]],
        ]
    )
    writer = GeoParquetWriter(tmp_path, "predictions")
    writer.write("detections", WKT_32633, FeatureBatch(rings, {"score": np.array([0.5, 0.6])}))
    (path,) = writer.commit()
    table = pq.read_table(path, columns=["bbox"]).column("bbox").to_pylist()
    assert table == [
        {"xmin": -1.0, "ymin": 0.0, "xmax": 2.0, "ymax": 3.0},
        {"xmin": 9.5, "ymin": 5.0, "xmax": 13.0, "ymax": 9.0},
    ]
    read_geoparquet(path)  # and every other rule of the spec


def test_raster_without_crs_writes_crs_null_not_a_missing_crs(tmp_path: Path) -> None:
    """A missing ``crs`` means OGC:CRS84 to a reader; pixel coordinates have no CRS at all."""
    writer = GeoParquetWriter(tmp_path, "predictions")
    writer.write("detections", None, _boxes(2))
    (path,) = writer.commit()
    _, _, crs, geo = read_geoparquet(path)
    assert crs is None and "crs" in geo["columns"]["geometry"]


def test_one_file_per_layer_and_empty_layers_still_get_a_file(tmp_path: Path) -> None:
    writer = GeoParquetWriter(tmp_path, "predictions", row_group_rows=3)
    writer.write("detections_epsg_32633", WKT_32633, _boxes(4))
    writer.write("detections_none", None, _boxes(0))
    writer.write("detections_epsg_32633", WKT_32633, _boxes(0))  # an empty raster of the layer
    writer.write("detections_epsg_32633", WKT_32633, _boxes(2, start=4))
    paths = writer.commit()
    assert [p.name for p in paths] == ["detections_epsg_32633.parquet", "detections_none.parquet"]
    assert _row_groups(paths[0]) == [3, 3]
    geoms, table, _, geo = read_geoparquet(paths[1])
    assert geoms == [] and table.num_rows == 0 and "bbox" not in geo["columns"]["geometry"]
    assert table.column_names == ["score", "class_id", "label", "tile_key"]
    assert str(table.schema.field("label").type) == "string"


def test_abort_leaves_the_run_directory_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "detections.parquet").write_bytes(b"earlier result")
    writer = GeoParquetWriter(tmp_path, "predictions", row_group_rows=2)
    writer.write("detections", WKT_32633, _boxes(5))  # two row groups already on disk
    writer.write("classifications", WKT_32633, _boxes(1))
    writer.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["detections.parquet"]
    assert (tmp_path / "detections.parquet").read_bytes() == b"earlier result"
    assert writer.commit() == []


def test_batches_that_do_not_fit_the_layer_are_refused(tmp_path: Path) -> None:
    writer = GeoParquetWriter(tmp_path, "predictions")
    writer.write("detections", WKT_32633, _boxes(2))
    with pytest.raises(ValueError, match="another CRS"):
        writer.write("detections", None, _boxes(1))
    other = FeatureBatch(_boxes(1).rings, {"score": np.array([0.5])})
    with pytest.raises(ValueError, match=r"columns \['score'\] do not match"):
        writer.write("detections", WKT_32633, other)
    with pytest.raises(ValueError, match="not a plain file name"):
        writer.write("../elsewhere", WKT_32633, _boxes(1))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_clockwise_rings_are_written_counterclockwise() -> None:
    ccw = _boxes(2).rings
    cw = ccw[:, ::-1]
    fixed = counterclockwise(np.concatenate([ccw, cw]))
    np.testing.assert_array_equal(fixed, np.concatenate([ccw, ccw]))  # reversed back
    assert all(shapely.is_ccw(shapely.linearrings(fixed)))


def test_parquet_and_gpkg_hold_the_same_features(tmp_path: Path) -> None:
    from conftest import read_gpkg_layer

    writers = vector_writers("both", tmp_path, "predictions")
    assert [type(w) for w in writers] == [GpkgWriter, GeoParquetWriter]
    for batch in (_boxes(3), _boxes(4, start=3)):
        for writer in writers:
            writer.write("detections", WKT_32633, batch)
    paths = [p for w in writers for p in w.commit()]
    assert [p.name for p in paths] == ["predictions.gpkg", "detections.parquet"]
    g_geoms, g_rows, epsg = read_gpkg_layer(paths[0], "detections")
    p_geoms, table, crs, _ = read_geoparquet(paths[1])
    assert epsg == 32633 and crs is not None and crs.to_epsg() == 32633
    assert shapely.equals(g_geoms, p_geoms).all()
    for row in g_rows:
        row.pop("fid")
    assert table.to_pylist() == g_rows
