"""Detections across the antimeridian stay one small box in every output CRS and on the ground.

A UTM zone 60 raster over Fiji whose boxes cross 180 degrees E was written, under
``output_crs=EPSG:4326``, with corners at +180 and -180 (boxes 359.9999 degrees wide), and every
such box's area_m2 was hundreds of square kilometres for ~450 m^2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import read_gpkg_layer, run_mgpr_inprocess
from pyproj import Transformer

from mgpr.geo.antimeridian import unwrap_geometries, unwrap_rings, wrap_period
from mgpr.geo.ground_area import box_ground_areas_m2, ground_areas_m2
from mgpr.geo.reproject import crs_wkt_of


@pytest.mark.parametrize(
    ("crs", "period"),
    [("EPSG:4326", 360.0), ("EPSG:3857", 40075016.68557823), ("EPSG:32760", None),
     ("EPSG:3035", None), ("EPSG:3031", None)],
)  # fmt: skip
def test_wrap_period_of_geographic_and_cylindrical_crss_only(crs: str, period) -> None:
    assert wrap_period(crs) == (pytest.approx(period, rel=1e-9) if period else None)


def test_unwrap_keeps_small_rings_continuous_and_leaves_the_others() -> None:
    crossing = [[179.9999, 1], [-179.9999, 1], [-179.9999, 1.001], [179.9999, 1.001],
                [179.9999, 1]]  # fmt: skip
    plain = [[10, 1], [11, 1], [11, 1.001], [10, 1.001], [10, 1]]
    rings = np.array([crossing, plain], dtype=np.float64)
    out = unwrap_rings(rings, 360.0)
    np.testing.assert_allclose(out[0, :, 0], [179.9999, 180.0001, 180.0001, 179.9999, 179.9999])
    np.testing.assert_array_equal(out[1], rings[1])
    assert unwrap_rings(rings, None) is rings
    polygon = shapely.Polygon(crossing)
    (moved,) = unwrap_geometries(np.array([polygon], dtype=object), 360.0)
    assert moved.bounds[2] - moved.bounds[0] == pytest.approx(0.0002)
    wkt = crs_wkt_of("EPSG:4326")
    areas = ground_areas_m2(np.array([polygon], dtype=object), wkt)
    boxes = box_ground_areas_m2(rings[:1], wkt)
    assert areas[0] == pytest.approx(boxes[0], rel=1e-5) and 2.4e3 < areas[0] < 2.5e3


@pytest.mark.parametrize("output_crs", ["EPSG:4326", "EPSG:3857"])
def test_boxes_across_180_east_stay_small_in_the_output_crs(
    make_image, tmp_path: Path, output_crs: str
) -> None:
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True)
    x180, y = to_utm.transform(180.0, -16.5)
    pixel = 0.5
    spec = {"width": 1024, "height": 512, "objects": 12, "crs": "EPSG:32760",
            "pixel_size": pixel, "origin_y": y, "seed": 3}  # fmt: skip
    layout = make_image("layout.tif", **spec).objects  # the layout is in pixels: any origin
    middle = (layout[0].col_min + layout[0].col_max) / 2  # 180 E through this object
    img = make_image("fiji.tif", origin_x=x180 - middle * pixel, **spec)
    lon_min, _ = Transformer.from_crs("EPSG:32760", "EPSG:4326", always_xy=True).transform(
        x180 - (middle - layout[0].col_min) * pixel, y
    )
    assert 179.99 < lon_min < 180.0  # an object's west edge lies west of 180 E, its east east
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference", "tile_size=256", "overlap=64",
        "workers=0", f"output_dir={run}", f"output_crs={output_crs}",
    )  # fmt: skip
    assert code == 0
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert len(geoms) == len(img.objects)
    spans = np.array([g.bounds[2] - g.bounds[0] for g in geoms])
    small = 0.01 if output_crs == "EPSG:4326" else 2000.0  # degrees / metres: boxes < 1 km
    assert (spans < small).all(), spans.max()
    # the 512 m raster's boxes lie together on one side of the line, not at both ends of the map
    x0 = min(g.bounds[0] for g in geoms)
    assert max(g.bounds[2] for g in geoms) - x0 < small, [g.bounds for g in geoms]
    # ground areas against the boxes' own areas in UTM (scale ~1 there)
    for row in rows:
        utm_area = (row["px_xmax"] - row["px_xmin"]) * (row["px_ymax"] - row["px_ymin"]) * 0.25
        assert row["area_m2"] == pytest.approx(utm_area, rel=0.01)


def _fiji(make_image, name: str):  # type: ignore[no-untyped-def]
    """A 1024 x 512 px, 0.5 m UTM 60 S raster whose middle column lies on 180 E."""
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32760", always_xy=True)
    x180, y = to_utm.transform(180.0, -16.5)
    spec = {"width": 1024, "height": 512, "objects": 12, "crs": "EPSG:32760",
            "pixel_size": 0.5, "origin_y": y, "seed": 3}  # fmt: skip
    return make_image(name, origin_x=x180 - 512 * 0.5, **spec)


@pytest.mark.parametrize("output_crs", ["EPSG:4326", "EPSG:3857"])
def test_segments_of_a_raster_across_180_east_stay_together(
    make_image, tmp_path: Path, output_crs: str
) -> None:
    """The background region crosses the line and its holes are the objects: each object must
    be written where its hole is, not 360 degrees away (they were, for those east of 180 E)."""
    img = _fiji(make_image, "fiji.tif")
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference-seg", "vectorize=true", "tile_size=256",
        "overlap=64", "workers=0", f"output_dir={run}", f"output_crs={output_crs}",
    )  # fmt: skip
    assert code == 0
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "segments")
    small = 0.01 if output_crs == "EPSG:4326" else 2000.0
    x0 = min(g.bounds[0] for g in geoms)
    assert max(g.bounds[2] for g in geoms) - x0 < small, [g.bounds for g in geoms]
    objects = [g for g, r in zip(geoms, rows, strict=True) if r["class_id"] != 0]
    (background,) = [g for g, r in zip(geoms, rows, strict=True) if r["class_id"] == 0]
    assert len(objects) >= 10
    holes = [shapely.Polygon(ring) for ring in background.interiors]
    for obj in objects:  # every object fills one of the background's holes
        assert max(obj.intersection(h).area / obj.area for h in holes) > 0.99, obj.bounds


def test_long_edges_are_densified_before_they_are_reprojected(make_image, tmp_path: Path) -> None:
    """A 200 m raster's 1024 px straight edge (204.8 km) became one chord in EPSG:4326, ~1 km
    off the true footprint; with a vertex every 64 px (12.8 km) it stays within ~4 m."""
    img = make_image(
        "coarse.tif", width=1024, height=1024, objects=10, pixel_size=200.0,
        origin_x=300000.0, origin_y=5600000.0, crs="EPSG:32633",
    )  # fmt: skip
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference-seg", "vectorize=true", "tile_size=512",
        "overlap=64", "workers=0", f"output_dir={run}", "output_crs=EPSG:4326",
    )  # fmt: skip
    assert code == 0
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "segments")
    # the written edges, straight in EPSG:4326, traced back into UTM point by point
    whole = shapely.segmentize(shapely.union_all(geoms), 0.001)  # degrees: ~100 m
    back = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    in_utm = shapely.transform(whole, lambda xy: np.column_stack(back.transform(*xy.T)))
    truth = shapely.box(300000.0, 5600000.0 - 204800.0, 300000.0 + 204800.0, 5600000.0)
    assert shapely.hausdorff_distance(in_utm, truth) < 10.0  # metres: 0.05 px
