"""``output_crs``: every input's vector results in one layer of one CRS (the command, CPU).

Two generated rasters on either side of a UTM zone boundary (33N and 34N) are the case the key
is for: without it a run writes one layer per zone; with ``output_crs=EPSG:4326`` one layer
``detections``, each box the same four corners reprojected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from conftest import read_gpkg_layer, run_mgpr_inprocess, segmentation_args
from geoparquet_helpers import read_geoparquet
from pyproj import Transformer

from mgpr.conf.load import load_config
from mgpr.errors import ConfigError, InputError
from mgpr.geo.raster import describe_raster
from mgpr.geo.reproject import check_output_crs


@pytest.fixture
def zones(make_image, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A folder of two rasters, one in UTM 33N and one in 34N, near their common meridian."""
    (tmp_path / "zones").mkdir()
    common = {"width": 640, "height": 512, "objects": 8, "tile_size": 256, "overlap": 64}
    make_image("zones/a.tif", crs="EPSG:32633", origin_x=780_000.0, seed=1, **common)
    make_image("zones/b.tif", crs="EPSG:32634", origin_x=220_000.0, seed=2, **common)
    return tmp_path / "zones"


def _args(inputs: Path, run: Path, *more: str) -> list[str]:
    return [
        f"input_path={inputs}",
        "model=reference",
        "tile_size=256",
        "overlap=64",
        "workers=0",
        "accelerator=cpu",
        "progress=false",
        "output_format=both",
        f"output_dir={run}",
        *more,
    ]


def test_two_zones_in_one_layer_of_the_output_crs(zones: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    own, one = tmp_path / "own", tmp_path / "one"
    assert run_mgpr_inprocess(*_args(zones, own)) == 0
    assert run_mgpr_inprocess(*_args(zones, one, "output_crs=EPSG:4326")) == 0
    out = capsys.readouterr().out
    assert "(16 records; layer detections: 16) in EPSG:4326" in out
    geoms, rows, srs = read_gpkg_layer(one / "predictions.gpkg", "detections")
    assert srs == 4326 and len(geoms) == 16
    summary = json.loads((one / "summary.json").read_text())
    assert summary["layers"] == {"detections": 16} and summary["output_crs"] == "EPSG:4326"
    # Each feature = the same feature of the run in its own CRS, corners reprojected.
    pairs = zip(geoms, rows, strict=True)
    by_key = {(r["tile_key"], r["px_xmin"], r["px_ymin"]): g for g, r in pairs}
    for zone, epsg in (("epsg32633", 32633), ("epsg32634", 32634)):
        theirs, their_rows, their_srs = read_gpkg_layer(
            own / "predictions.gpkg", f"detections_{zone}"
        )
        assert their_srs == epsg and len(theirs) == 8
        to_4326 = Transformer.from_crs(epsg, 4326, always_xy=True)
        for g, r in zip(theirs, their_rows, strict=True):
            mine = by_key[(r["tile_key"], r["px_xmin"], r["px_ymin"])]
            xy = np.asarray(g.exterior.coords)
            expected = np.column_stack(to_4326.transform(xy[:, 0], xy[:, 1]))
            assert np.abs(np.asarray(mine.exterior.coords) - expected).max() < 1e-9
            assert mine.exterior.is_ccw  # the orientation GeoPackage/GeoParquet expect
    # The GeoParquet layer says the same CRS; the previews stay right (drawn in each raster's).
    pq_geoms, table, crs, _ = read_geoparquet(one / "detections.parquet")
    assert crs is not None and crs.to_epsg() == 4326 and table.num_rows == 16
    assert (one / "preview_a.png").exists() and (one / "preview_b.png").exists()


def test_segments_in_the_output_crs(make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = make_image("a.tif", width=384, height=384, objects=6, tile_size=128, overlap=32)
    run = tmp_path / "run"
    args = segmentation_args(image.path, run, "vectorize=true", "output_crs=EPSG:3857")
    assert run_mgpr_inprocess(*args) == 0
    geoms, rows, srs = read_gpkg_layer(run / "predictions.gpkg", "segments")
    assert srs == 3857 and len(geoms) >= 6
    minx, miny, maxx, maxy = shapely.union_all(geoms).bounds
    to_utm = Transformer.from_crs(3857, 32633, always_xy=True)
    x, y = to_utm.transform([minx, maxx], [miny, maxy])
    # Back in UTM the segments lie on the raster (500000..500038.4 E, 4999961.6..5000000 N).
    assert 499_999.9 < x[0] < x[1] < 500_038.5 and 4_999_961.5 < y[0] < y[1] < 5_000_000.1


def test_output_crs_refusals(tmp_path: Path, make_image) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="output_crs='EPSG:99999' is not a CRS pyproj knows"):
        load_config(["output_crs=EPSG:99999"])
    assert load_config(["output_crs=null"]).output_crs is None
    plain = make_image("plain.tif", width=64, height=64, crs=None)
    with pytest.raises(
        InputError,
        match=r"has no CRS, so its results \(in pixel coordinates\) cannot be reprojected",
    ):
        check_output_crs([describe_raster(str(plain.path))], "EPSG:4326")
    utm = make_image("utm.tif", width=64, height=64)  # UTM 33N, 45 N 15 E
    far_side = "+proj=ortho +lat_0=-45 +lon_0=-165 +datum=WGS84"  # the other hemisphere
    with pytest.raises(InputError, match="lies outside the area output_crs"):
        check_output_crs([describe_raster(str(utm.path))], far_side)
    check_output_crs([describe_raster(str(utm.path))], "EPSG:4326")  # covers every input


def test_output_crs_away_from_its_area_of_use_warns(make_image, caplog) -> None:  # type: ignore[no-untyped-def]
    utm = make_image("utm.tif", width=64, height=64)
    check_output_crs([describe_raster(str(utm.path))], "EPSG:32634")  # the next zone: fine
    assert "area of use" not in caplog.text
    check_output_crs([describe_raster(str(utm.path))], "EPSG:3031")  # Antarctic polar
    assert "outside output_crs=EPSG:3031's area of use (-180..180 E, -90..-60 N)" in caplog.text
