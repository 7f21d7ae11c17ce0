"""FeatureBatch with general polygons (holes, several parts) through every vector writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely
from geoparquet_helpers import read_geoparquet
from test_vector_writers import WKT_32633

from mgpr.outputs.features import read_features, write_features
from mgpr.outputs.formats import vector_writers
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import FeatureBatch

X0, Y0 = 500_000.0, 5_800_000.0


def _holed(x: float) -> shapely.Polygon:
    """A 10 m square with a 2 m hole, exterior clockwise (as rasterio traces it), hole CCW."""
    shell = [(x, Y0), (x, Y0 + 10), (x + 10, Y0 + 10), (x + 10, Y0), (x, Y0)]
    hole = [(x + 4, Y0 + 4), (x + 6, Y0 + 4), (x + 6, Y0 + 6), (x + 4, Y0 + 6), (x + 4, Y0 + 4)]
    return shapely.Polygon(shell, [hole])


def _multi(x: float) -> shapely.MultiPolygon:
    return shapely.MultiPolygon([shapely.box(x, Y0, x + 1, Y0 + 1), _holed(x + 2)])


def _batch(geoms: list[shapely.Geometry], start: int = 0) -> FeatureBatch:
    n = len(geoms)
    return FeatureBatch.of_geometries(
        geoms,
        {
            "class_id": np.arange(start, start + n, dtype=np.int64),
            "label": np.array([f"c{i}" for i in range(start, start + n)], dtype=object),
            "area": np.array([g.area for g in geoms], dtype=np.float64),
        },
    )


def _boxes(n: int) -> FeatureBatch:
    x = X0 + 20.0 * np.arange(n)[:, None]
    xs = x + np.array([0, 1, 1, 0, 0])
    ys = np.broadcast_to(Y0 + np.array([0, 0, 1, 1, 0]), (n, 5))
    rings = np.stack([xs, ys], axis=2).astype(np.float64)
    return FeatureBatch(
        rings,
        {
            "class_id": np.zeros(n, np.int64),
            "label": np.array(["box"] * n, dtype=object),
            "area": np.ones(n),
        },
    )


def test_batch_forms_validate_and_describe_themselves() -> None:
    geoms = [_holed(X0), _multi(X0 + 50)]
    batch = _batch(geoms)
    assert len(batch) == 2 and not batch.is_rings and batch.rings is None
    assert batch.geometry_types() == ("MultiPolygon", "Polygon")
    np.testing.assert_array_equal(batch.bounds(), shapely.bounds(geoms))
    boxes = _boxes(3)
    assert boxes.is_rings and boxes.geometry_types() == ("Polygon",)
    np.testing.assert_array_equal(boxes.bounds(), shapely.bounds(boxes.shapes()))
    with pytest.raises(ValueError, match="exactly one"):
        FeatureBatch(None, {})
    with pytest.raises(ValueError, match=r"\(Multi\)Polygons, got LineString"):
        FeatureBatch.of_geometries([shapely.LineString([(0, 0), (1, 1)])], {})
    with pytest.raises(ValueError, match="has 1 rows, not 2"):
        FeatureBatch.of_geometries(geoms, {"a": np.zeros(1)})


def test_concat_keeps_boxes_as_rings_and_mixes_into_geometries() -> None:
    both = FeatureBatch.concat([_boxes(2), _boxes(1)])
    assert both.is_rings and len(both) == 3
    mixed = FeatureBatch.concat([_boxes(2), _batch([_holed(X0 + 100)])])
    assert not mixed.is_rings and len(mixed) == 3
    assert shapely.equals(mixed.shapes()[2], _holed(X0 + 100))
    assert shapely.equals(mixed.shapes()[0], _boxes(1).shapes()[0])
    assert mixed.fields["label"].tolist() == ["box", "box", "c0"]


@pytest.mark.parametrize("kinds", [("Polygon",), ("MultiPolygon", "Polygon")])
def test_holes_and_multipolygons_round_trip_through_both_formats(
    tmp_path: Path, kinds: tuple[str, ...]
) -> None:
    geoms: list[shapely.Geometry] = [_holed(X0), _holed(X0 + 20)]
    if "MultiPolygon" in kinds:  # in the first batch: it sets the GeoPackage layer's type
        geoms.insert(0, _multi(X0 + 40))
    writers = vector_writers("both", tmp_path, "predictions")
    for writer in writers:
        writer.write("segments", WKT_32633, _batch(geoms[:1]))
        writer.write("segments", WKT_32633, _batch(geoms[1:], start=1))
        writer.write("segments_empty", None, _batch([]))
    paths = [p for w in writers for p in w.commit()]
    assert sorted(p.name for p in paths) == [
        "predictions.gpkg",
        "segments.parquet",
        "segments_empty.parquet",
    ]
    # GeoPackage: the same geometries (Polygons stay Polygons unless the layer is Multi).
    meta, _fids, wkb, data = pyogrio.raw.read(tmp_path / "predictions.gpkg", layer="segments")
    back = shapely.from_wkb(wkb)
    assert meta["geometry_type"] == ("MultiPolygon" if len(kinds) == 2 else "Polygon")
    assert all(shapely.equals(a, b) for a, b in zip(back, geoms, strict=True))
    assert [len(g.interiors) for g in back if g.geom_type == "Polygon"] == [1] * (
        sum(g.geom_type == "Polygon" for g in back)
    )
    assert data[0].tolist() == list(range(len(geoms)))
    if len(kinds) == 2:  # a Polygon in a MultiPolygon layer comes back as its one part
        assert [len(g.geoms) for g in back] == [2, 1, 1]
    # GeoParquet: valid metadata with both types, exteriors CCW, holes CW, bbox = bounds.
    pq_geoms, table, crs, geo = read_geoparquet(tmp_path / "segments.parquet", kinds)
    assert crs is not None and crs.to_epsg() == 32633
    assert all(shapely.equals(a, b) for a, b in zip(pq_geoms, geoms, strict=True))
    assert [g.geom_type for g in pq_geoms] == [g.geom_type for g in geoms]
    assert table.column_names == ["class_id", "label", "area"]
    assert geo["columns"]["geometry"]["bbox"] == [
        *np.min(shapely.bounds(geoms)[:, :2], axis=0),
        *np.max(shapely.bounds(geoms)[:, 2:], axis=0),
    ]
    empty, _t, no_crs, _g = read_geoparquet(tmp_path / "segments_empty.parquet")
    assert empty == [] and no_crs is None


def test_gpkg_refuses_multipolygons_in_a_polygon_layer(tmp_path: Path) -> None:
    writer = GpkgWriter(tmp_path, "predictions")
    writer.write("segments", WKT_32633, _batch([_holed(X0)]))
    with pytest.raises(ValueError, match="holds Polygons"):
        writer.write("segments", WKT_32633, _batch([_multi(X0 + 20)]))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_box_layers_still_declare_polygon_only(tmp_path: Path) -> None:
    (writer,) = vector_writers("parquet", tmp_path, "predictions")
    writer.write("detections", WKT_32633, _boxes(4))
    writer.commit()
    geoms, _table, _crs, geo = read_geoparquet(tmp_path / "detections.parquet")
    assert len(geoms) == 4 and geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]


def test_feature_files_carry_geometries(tmp_path: Path) -> None:
    geoms = [_holed(X0), _multi(X0 + 20)]
    path = write_features(tmp_path / "f.parquet", _batch(geoms), {"path": "a.tif"})
    back, meta = read_features(path)
    assert meta == {"path": "a.tif"} and not back.is_rings
    assert all(shapely.equals(a, b) for a, b in zip(back.shapes(), geoms, strict=True))
    assert back.fields["label"].tolist() == ["c0", "c1"]
    boxes, _ = read_features(write_features(tmp_path / "b.parquet", _boxes(2), {}))
    assert boxes.is_rings and len(boxes) == 2
