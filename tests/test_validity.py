"""Where a raster holds data when producers combine masks: alpha beside nodata, RGB + NIR.

rasterio's ``dataset_mask`` takes band 4's nodata mask for any 4-band raster whose band 1 is red
and lets a nodata value shadow an alpha band, so an RGBA file with nodata=255 came out inverted
(only the transparent pixels valid) and RGB + NIR with nodata=0 lost water (NIR = 0) under valid
red, green and blue. mgpr.geo.validity applies one rule everywhere (tiles, previews, auto).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import read_gpkg_layer, run_mgpr_inprocess
from rasterio.enums import ColorInterp

from mgpr.geo.validity import read_validity, validity_source
from mgpr.monitor.decimated_read import read_decimated
from mgpr.run.finish import demo_check

GRID = ("tile_size=256", "overlap=64", "workers=0")


def _none() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _run(path: Path, run: Path, *keys: str) -> int:
    return run_mgpr_inprocess(
        f"input_path={path}", "model=reference", *GRID, f"output_dir={run}", *keys
    )


def _every_object_once(run: Path, img) -> None:
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == check["planted"] == len(img.objects), check
    assert check["duplicates"] == 0 and check["unmatched_detections"] == 0, check


def _none_over(run: Path, hidden) -> None:
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    for obj in hidden:
        for r in rows:
            cols = min(r["px_xmax"], obj.col_max) - max(r["px_xmin"], obj.col_min)
            lines = min(r["px_ymax"], obj.row_max) - max(r["px_ymin"], obj.row_min)
            assert cols <= 0 or lines <= 0, (obj, r)


@pytest.mark.parametrize(("bands", "nodata"), [(3, 255), (3, 0), (1, 255), (1, 0)])
def test_alpha_band_is_the_mask_whatever_nodata_value_the_file_also_declares(
    make_image, tmp_path: Path, capsys: pytest.CaptureFixture[str], bands: int, nodata: int
) -> None:
    img = make_image(
        "alpha.tif", width=768, height=640, bands=bands, objects=8, hidden_objects=2,
        nodata="rect", nodata_mode="alpha", tile_size=256, overlap=64,
    )  # fmt: skip
    with rasterio.open(img.path, "r+") as dst:
        dst.nodata = nodata  # what some exporters write beside the alpha band
    with rasterio.open(img.path) as src:
        assert validity_source(src) == "alpha"
        alpha = src.read(src.count)
        np.testing.assert_array_equal(read_validity(src) > 0, alpha > 0)
        assert (alpha == 0).any() and (alpha > 0).any()
        if (bands, nodata) != (3, 0):  # band 4's nodata mask: alpha != 0, by chance right
            # rasterio's own rule gets these files wrong (inverted for RGBA + 255, alpha
            # ignored for grey + alpha): the reason the rule is mgpr's
            with pytest.warns(rasterio.errors.NodataShadowWarning) if bands == 3 else _none():
                assert not np.array_equal(src.dataset_mask() > 0, alpha > 0)
        decimated = read_decimated(src, None, (160, 192), rasterio.enums.Resampling.nearest)
        np.testing.assert_array_equal(decimated > 0, alpha[::4, ::4] > 0)
    run = tmp_path / "run"
    assert _run(img.path, run) == 0
    _every_object_once(run, img)
    _none_over(run, img.hidden)
    assert f"has an alpha band and nodata={nodata}: its alpha band says" in capsys.readouterr().err


def test_rgb_nir_pixel_is_valid_where_any_band_differs_from_nodata(
    make_image, tmp_path: Path
) -> None:
    img = make_image("rgb.tif", width=768, height=640, objects=8, tile_size=256, overlap=64)
    with rasterio.open(img.path) as src:
        rgb, profile = src.read(), src.profile
    nir = np.full(rgb.shape[1:], 120, np.uint8)
    nir[:, :384] = 0  # water: no near-infrared return, red/green/blue still valid
    assert sum(obj.col_max <= 384 for obj in img.objects) >= 2  # objects over the water
    profile.update(count=4, nodata=0, photometric="rgb")
    path = tmp_path / "rgbn.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([rgb, nir[None]]))
        dst.colorinterp = [
            ColorInterp.red,
            ColorInterp.green,
            ColorInterp.blue,
            ColorInterp.undefined,
        ]
    with rasterio.open(path) as src:
        assert validity_source(src) == "nodata"
        mask = read_validity(src)
        assert (mask > 0).all()  # no pixel is 0 in all four bands
        assert (src.dataset_mask()[:, :384] == 0).all()  # rasterio: band 4 alone decides
    run = tmp_path / "run"
    assert _run(path, run, "bands=[1,2,3]") == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == check["planted"] == len(img.objects), check


def test_mask_band_and_plain_nodata_keep_gdals_rule(make_image) -> None:
    masked = make_image("m.tif", width=300, height=200, nodata="rect", nodata_mode="mask")
    with rasterio.open(masked.path) as src:
        assert validity_source(src) == "mask"
        np.testing.assert_array_equal(read_validity(src), src.dataset_mask())
    valued = make_image("v.tif", width=300, height=200, nodata="border", nodata_value=0)
    with rasterio.open(valued.path) as src:
        assert validity_source(src) == "nodata"
        np.testing.assert_array_equal(read_validity(src), src.dataset_mask())
        window = rasterio.windows.Window(10, 20, 100, 50)
        out = np.empty((50, 100), np.uint8)
        assert read_validity(src, window=window, out=out) is out
        np.testing.assert_array_equal(out, src.dataset_mask(window=window))
    plain = make_image("p.tif", width=64, height=64)
    with rasterio.open(plain.path) as src:
        assert validity_source(src) == "none" and (read_validity(src) == 255).all()
