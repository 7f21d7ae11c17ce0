"""``gsd=``: the model grid's maths, resampled reads, and the ``mgpr`` command on generated
GeoTIFFs whose pixels are finer (or coarser) than the model's (CPU, one rank, in process)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import read_gpkg_layer, run_mgpr_inprocess, web_mercator_y
from hypothesis import given
from hypothesis import strategies as st

from mgpr.conf.load import load_config
from mgpr.errors import ConfigError, InputError
from mgpr.geo.gsd import check_gsd_crs, describe_crs_scale, describe_model_grid, on_model_grid
from mgpr.geo.model_grid import (
    ModelGrid,
    gsd_factors,
    model_size,
    model_transform,
    native_spans,
    resolve_resampling,
)
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.run.finish import demo_check

#: Model-grid tiling of the runs below; the generator plants its seam objects on the same
#: seams in NATIVE pixels (tile_size and overlap times the factor).
TILE, OVERLAP = 128, 32


# ---------------------------------------------------------------- the pure grid maths


def test_factors_sizes_and_transform() -> None:
    native = Affine(0.1, 0.0, 500000.0, 0.0, -0.1, 5000000.0)
    assert gsd_factors(native, 0.2) == (2.0, 2.0)
    assert gsd_factors(native, 0.15) == (1.5, 1.5)  # not 1.4999999999999998
    assert gsd_factors(Affine(0.05, 0, 0, 0, -0.1, 0), 0.1) == (2.0, 1.0)  # non-square pixels
    assert model_size(1000, 2.0) == 500 and model_size(999, 2.0) == 500
    assert model_size(1000, 1.5) == 667 and model_size(10, 0.3) == 34 and model_size(1, 5.0) == 1
    t = model_transform(native, 1.5, 1.5)
    assert t.a == pytest.approx(0.15) and t.e == pytest.approx(-0.15)
    for col, row in [(0, 0), (3, 7), (666, 599)]:  # model corner == native corner * f
        assert t * (col, row) == pytest.approx(native * (col * 1.5, row * 1.5))
    assert resolve_resampling("auto", 2.0, 2.0) == "average"
    assert resolve_resampling("auto", 0.5, 0.5) == "bilinear"
    assert resolve_resampling("nearest", 2.0, 2.0) == "nearest"


def test_native_spans_interior_and_partial_last_pixel() -> None:
    # Interior: one span, exactly f native pixels per model pixel.
    assert native_spans(96, 128, 2.0, 1000) == [(0, 128, 192.0, 256.0)]
    # 1000 native px at f=1.5: 666 whole model pixels, the 667th covers native [999, 1000).
    assert native_spans(576, 91, 1.5, 1000) == [(0, 90, 864.0, 135.0), (90, 1, 999.0, 1.0)]
    # A tile that is only the partial pixel's column.
    assert native_spans(666, 1, 1.5, 1000) == [(0, 1, 999.0, 1.0)]
    # Upsampling (f < 1): 10 native px -> 34 model px, the last covers native [9.9, 10).
    spans = native_spans(30, 4, 0.3, 10)
    assert [s[:2] for s in spans] == [(0, 3), (3, 1)]
    assert spans[1].native_start == pytest.approx(9.9) and spans[1].native_len == pytest.approx(0.1)


@given(
    native=st.integers(1, 3000),
    factor=st.sampled_from([0.25, 0.3, 0.5, 1.25, 1.5, 2.0, 3.0, 10 / 3]),
    tile=st.integers(8, 300),
    overlap_share=st.floats(0.0, 0.9),
)
def test_spans_cover_each_tile_exactly(
    native: int, factor: float, tile: int, overlap_share: float
) -> None:
    """Per tile of the model grid, the spans tile its valid part and its native footprint."""
    overlap = min(tile - 1, int(tile * overlap_share))
    size = model_size(native, factor)
    for t in plan_tiles("a.tif", 1, size, tile, overlap):
        spans = native_spans(t.col_off, t.valid_width, factor, native)
        assert 1 <= len(spans) <= 2
        assert sum(s.model_len for s in spans) == t.valid_width
        assert spans[0].model_start == 0 and spans[0].native_start == pytest.approx(
            t.col_off * factor
        )
        for a, b in zip(spans, spans[1:], strict=False):  # contiguous in both grids
            assert b.model_start == a.model_start + a.model_len
            assert b.native_start == pytest.approx(a.native_start + a.native_len)
        end = spans[-1].native_start + spans[-1].native_len
        assert end == pytest.approx(min((t.col_off + t.valid_width) * factor, native))
        assert all(s.native_len > 0 and s.native_start >= 0 for s in spans)
        assert end <= native + 1e-9


def test_model_grid_windows_at_the_corner() -> None:
    grid = ModelGrid(1.5, 2.0, native_height=301, native_width=1000, resampling="average")
    assert (grid.width, grid.height) == (667, 151)
    tiles = plan_tiles("a.tif", grid.height, grid.width, TILE, OVERLAP)
    corner = tiles[-1]
    parts = grid.windows(corner)
    assert len(parts) == 4  # whole pixels, right column, bottom row, corner pixel
    assert sum(h * w for _, _, h, w, _ in parts) == corner.valid_height * corner.valid_width
    row, col, h, w, win = parts[-1]
    assert (row + h, col + w) == (corner.valid_height, corner.valid_width)
    assert (win.col_off, win.row_off, win.width, win.height) == (999.0, 300.0, 1.0, 1.0)
    cover = grid.native_cover(corner)
    assert cover.col_off + cover.width == 1000 and cover.row_off + cover.height == 301
    assert len(grid.windows(tiles[0])) == 1


# ---------------------------------------------------------------- resampled reads


def _gradient(tmp_path: Path, width: int, height: int, res: float = 0.05) -> str:
    """A uint8 raster whose value at (row, col) is (row + 3 * col) % 256: every block differs."""
    rows, cols = np.mgrid[0:height, 0:width]
    data = ((rows + 3 * cols) % 256).astype(np.uint8)[None]
    path = str(tmp_path / "grad.tif")
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint8")
    transform = Affine(res, 0.0, 500000.0, 0.0, -res, 5000000.0)
    with rasterio.open(path, "w", crs="EPSG:32633", transform=transform, **profile) as dst:
        dst.write(data)
    return path


def test_reader_averages_each_model_pixel_over_its_native_pixels(tmp_path: Path) -> None:
    path = _gradient(tmp_path, width=301, height=260)  # odd width: a partial last model column
    info = on_model_grid(describe_raster(path), 0.1, "average")
    assert (info.width, info.height) == (151, 130) and info.resampling == "average"
    assert (info.native_width, info.native_height) == (301, 260)
    with rasterio.open(path) as src:
        native = src.read(1).astype(np.float64)
    reader = TileReader({path: [1]}, TILE, grids={path: info.model_grid})
    for tile in plan_tiles(path, info.height, info.width, TILE, 0):
        got = reader.read(tile)[0].astype(np.float64)
        for r in range(tile.valid_height):
            for c in range(0, tile.valid_width, 17):
                R, C = tile.row_off + r, tile.col_off + c
                want = native[2 * R : 2 * R + 2, 2 * C : 2 * C + 2].mean()  # 1 px wide at edge
                assert abs(got[r, c] - want) <= 0.5 + 1e-9, (tile.id, r, c, got[r, c], want)
        assert not got[tile.valid_height :].any() and not got[:, tile.valid_width :].any()
    reader.close()


def test_empty_model_tiles_are_told_from_the_native_mask(tmp_path: Path) -> None:
    """Nodata (value 0) left of native column 130: model tiles (f=2) over it are empty."""
    path = _gradient(tmp_path, width=256, height=64)
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[:, :, :130] = 0
        data[:, :, 130:] = np.maximum(data[:, :, 130:], 1)
        dst.write(data)
        dst.nodata = 0
    info = on_model_grid(describe_raster(path), 0.1, "auto")
    assert info.has_mask and (info.width, info.height) == (128, 32)
    reader = TileReader({path: [1]}, 32, grids={path: info.model_grid})
    tiles = plan_tiles(path, info.height, info.width, 32, 0)
    # Model columns 0-31, 32-63 cover native 0-127 (all nodata); 64-95 covers 128-191.
    assert [reader.is_empty(t, True) for t in tiles] == [True, True, False, False]
    reader.close()


def test_gsd_equal_to_the_native_pixel_reads_natively(tmp_path: Path) -> None:
    path = _gradient(tmp_path, width=200, height=100, res=0.1)
    info = on_model_grid(describe_raster(path), 0.1, "auto")
    assert info.model_grid is None and (info.factor_x, info.factor_y) == (1.0, 1.0)
    assert (info.width, info.height, info.transform) == (200, 100, info.native_transform)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", ["gsd=0", "gsd=-0.1", "resampling=sinc"])
def test_bad_gsd_or_resampling_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=value.split("=")[0]):
        load_config([value])


def test_gsd_needs_a_projected_crs_in_metres(make_image, tmp_path: Path) -> None:
    geo = make_image("geo.tif", width=64, height=64, crs="EPSG:4326", pixel_size=1e-6,
                     origin_x=15.0, origin_y=45.0)  # fmt: skip
    with pytest.raises(InputError, match=r"geographic.*gdalwarp -t_srs EPSG:32633 "):
        check_gsd_crs(describe_raster(str(geo.path)), 0.1)
    # near the pole UTM ends (UPS instead); across 180 E the centre's longitude wraps (zone 1)
    for origin_x, origin_y, want in [(10.0, 89.9999, "EPSG:32661"),
                                     (179.99999, -16.5, "EPSG:32701")]:  # fmt: skip
        far = dataclasses.replace(
            describe_raster(str(geo.path)),
            native_transform=Affine(1e-6, 0, origin_x, 0, -1e-6, origin_y),
        )
        with pytest.raises(InputError, match=f"gdalwarp -t_srs {want} "):
            check_gsd_crs(far, 0.1)
    feet = make_image("ft.tif", width=64, height=64, crs="EPSG:2263", origin_x=1e6, origin_y=2e5)
    with pytest.raises(InputError, match=r"projected, (us survey )?foot"):
        check_gsd_crs(describe_raster(str(feet.path)), 0.1)
    utm = describe_raster(str(make_image("utm.tif", width=64, height=64).path))
    check_gsd_crs(utm, 0.1)
    gcps = dataclasses.replace(utm, crs_wkt=None, gcp_crs="EPSG:4326")
    with pytest.raises(InputError, match=r"by GCPs \(EPSG:4326\).*gdalwarp -t_srs EPSG:XXXX"):
        check_gsd_crs(gcps, 0.1)
    rotated = dataclasses.replace(utm, native_transform=Affine(0.1, 0.02, 0, 0.02, -0.1, 0))
    with pytest.raises(InputError, match="north-up"):
        check_gsd_crs(rotated, 0.1)


def test_gsd_without_crs_is_refused_before_any_work(make_image, tmp_path: Path, capsys) -> None:
    img = make_image("pix.tif", width=256, height=256, crs="none")
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference", "gsd=0.1", "workers=0", f"output_dir={run}"
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert [e for e in err if "error" in e.lower()] == [line], err  # one line, the last one
    assert "gsd=0.1" in line and "pix.tif" in line and "has no CRS" in line
    assert "gdal_translate -a_srs EPSG:XXXX -a_ullr" in line
    assert [p.name for p in run.iterdir()] == ["logs"]  # no run.json, no parts, no output


# ---------------------------------------------------------------- the command, end to end


def _image(make_image, factor: float, name: str = "fine.tif", **spec: object):
    """A raster whose pixels are 10 cm / ``factor``, seam objects on the model grid's seams."""
    return make_image(
        name,
        width=round(420 * factor),
        height=round(380 * factor),
        pixel_size=0.1 / factor,
        objects=10,
        object_min_px=math.ceil(12 * factor),
        object_max_px=math.floor(OVERLAP * factor),
        tile_size=round(TILE * factor),
        overlap=round(OVERLAP * factor),
        seed=4,
        **spec,
    )


def _run(img, run: Path, *keys: str) -> int:
    return run_mgpr_inprocess(
        f"input_path={img.path}",
        f"tile_size={TILE}",
        f"overlap={OVERLAP}",
        "workers=0",
        f"output_dir={run}",
        *keys,
    )


@pytest.mark.parametrize("factor", [2.0, 1.5])
def test_detections_at_gsd_match_the_truth_within_one_model_pixel(
    make_image, tmp_path: Path, factor: float, capsys
) -> None:
    img = _image(make_image, factor)
    run = tmp_path / "run"
    assert _run(img, run, "model=reference", "gsd=0.1") == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)  # truth in native pixels
    assert check["planted"] == 10 and check["on_seam"] >= 4
    assert check["found"] == 10 and check["duplicates"] == 0, check
    assert check["unmatched_detections"] == 0, check
    assert check["max_footprint_error_px"] <= factor, check  # one model pixel, in native px
    # The polygons are the px_* boxes (native pixels) through the file's transform, exactly.
    geoms, rows, srs = read_gpkg_layer(run / "predictions.gpkg", "detections")
    native = describe_raster(str(img.path)).native_transform
    for geom, row in zip(geoms, rows, strict=True):
        x0, y1 = native * (row["px_xmin"], row["px_ymin"])
        x1, y0 = native * (row["px_xmax"], row["px_ymax"])
        assert geom.bounds == pytest.approx((x0, y0, x1, y1), abs=1e-6)
    assert srs == 32633
    summary = json.loads((run / "summary.json").read_text())
    grid = summary["resolution"]["inputs"][str(img.path)]
    assert grid["factor"] == [factor, factor] and grid["resampling"] == "average"
    assert (grid["model_width"], grid["model_height"]) == (420, 380)
    assert summary["provenance"]["inputs"][0]["width"] == round(420 * factor)  # the file's
    assert f"gsd          0.1 m per model pixel: x{factor:g} (average)" in capsys.readouterr().out


def test_a_web_mercator_metre_is_scaled_to_the_ground_and_utm_is_taken_as_it_is(
    make_image,
) -> None:
    """EPSG:3857 (XYZ tile downloads) stretches by 1 / cos(latitude): at 60 degrees N its 0.2 m
    pixels are 0.1 m on the ground, so gsd=0.1 reads them natively, not averaged 2x2."""
    merc = make_image("m.tif", width=64, height=64, crs="EPSG:3857", pixel_size=0.2,
                      origin_x=1113195.0, origin_y=web_mercator_y(60.0))  # fmt: skip
    info = on_model_grid(describe_raster(str(merc.path)), 0.1, "auto")
    assert info.crs_scale == pytest.approx(2.0, rel=1e-4)  # 1 / cos(60 deg)
    assert info.factor_x == pytest.approx(1.0, rel=1e-4) and info.width in (64, 65)
    assert "on the ground" in describe_model_grid(info)
    note = describe_crs_scale(info, 0.1)
    assert note is not None and "0.5 m on the ground" in note and "varies" not in note
    utm = on_model_grid(
        describe_raster(str(make_image("u.tif", width=64, height=64).path)), 0.2, "auto"
    )
    assert utm.crs_scale == 1.0 and utm.factor_x == 2.0  # UTM's 0.9996..1.001: face value
    assert describe_crs_scale(utm, 0.2) is None
    # A raster over 40 degrees of latitude has no one scale: said, with the centre's used.
    wide = make_image("w.tif", width=64, height=64, crs="EPSG:3857", pixel_size=70000.0,
                      origin_x=1113195.0, origin_y=web_mercator_y(70.0))  # fmt: skip
    wide_info = on_model_grid(describe_raster(str(wide.path)), 100000.0, "auto")
    assert "varies by" in (describe_crs_scale(wide_info, 100000.0) or "")


def test_detections_at_gsd_on_web_mercator_match_the_truth(make_image, tmp_path: Path) -> None:
    """Planted objects on a 3857 raster at 48.19 N (scale 1.5): gsd=0.1 on the ground is a model
    grid of 0.15 CRS metres, factor 1.5 over the 0.1 m pixels; every object found once."""
    lat = math.degrees(math.acos(1 / 1.5))
    img = make_image(
        "merc.tif", width=630, height=570, pixel_size=0.1, crs="EPSG:3857", origin_x=1113195.0,
        origin_y=web_mercator_y(lat), objects=10, object_min_px=18, object_max_px=48,
        tile_size=round(TILE * 1.5), overlap=round(OVERLAP * 1.5), seed=4,
    )  # fmt: skip
    run = tmp_path / "run"
    assert _run(img, run, "model=reference", "gsd=0.1") == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == 10 and check["duplicates"] == 0, check
    assert check["unmatched_detections"] == 0 and check["max_footprint_error_px"] <= 1.5, check
    grid = json.loads((run / "summary.json").read_text())["resolution"]["inputs"][str(img.path)]
    assert grid["crs_scale"] == pytest.approx(1.5, rel=1e-4)
    assert grid["factor"][0] == pytest.approx(1.5, rel=1e-4)


def test_classification_footprints_lie_on_the_model_grid(make_image, tmp_path: Path) -> None:
    img = _image(make_image, 1.5)
    run = tmp_path / "run"
    assert _run(img, run, "model=null", "gsd=0.1") == 0
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    info = on_model_grid(describe_raster(str(img.path)), 0.1, "auto")
    tiles = {t.id.key(): t for t in plan_tiles(info.path, 380, 420, TILE, OVERLAP)}
    assert len(geoms) == len(tiles) == 20  # 4 x 5 model tiles of 128 px, stride 96
    for geom, row in zip(geoms, rows, strict=True):
        t = tiles[row["tile_key"]]
        x0, y1 = info.transform * (t.col_off, t.row_off)  # the model grid's transform
        x1, y0 = info.transform * (t.col_off + t.valid_width, t.row_off + t.valid_height)
        assert geom.bounds == pytest.approx((x0, y0, x1, y1), abs=1e-6)
        assert info.transform.a == pytest.approx(0.1)  # model pixels of 10 cm


def test_another_gsd_or_resampling_refuses_the_resume(make_image, tmp_path: Path, capsys) -> None:
    img = _image(make_image, 2.0)
    run = tmp_path / "run"
    assert _run(img, run, "model=reference", "gsd=0.1") == 0
    stored = json.loads((run / "run.json").read_text())["fingerprint"]
    assert stored["gsd"] == 0.1 and stored["resampling"] == "auto"
    assert stored["inputs"][0]["model_grid"] == {
        "factor": [2.0, 2.0], "width": 420, "height": 380, "resampling": "average"
    }  # fmt: skip
    assert _run(img, run, "model=reference", "gsd=0.1") == 0  # the same: resumes
    capsys.readouterr()
    assert _run(img, run, "model=reference", "gsd=0.2") == 2
    assert "gsd differs: was 0.1, now 0.2" in capsys.readouterr().err
    assert _run(img, run, "model=reference", "gsd=0.1", "resampling=nearest") == 2
    assert "resampling differs" in capsys.readouterr().err
    assert _run(img, run, "model=reference") == 2  # back to native pixels: another run too
    assert "gsd differs: was 0.1, now none" in capsys.readouterr().err
