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
    # ground areas against the boxes' own areas in UTM (scale ~1 there)
    for row in rows:
        utm_area = (row["px_xmax"] - row["px_xmin"]) * (row["px_ymax"] - row["px_ymin"]) * 0.25
        assert row["area_m2"] == pytest.approx(utm_area, rel=0.01)
