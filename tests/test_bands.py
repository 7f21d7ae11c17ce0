"""Bands by index or name, RGB picked by colour interpretation, alpha never model input, GCPs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import write_paletted
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

from mgpr.errors import ConfigError
from mgpr.geo.bands import check_bands
from mgpr.geo.raster import describe_raster
from mgpr.outputs.rundir import _first_difference

CI = ColorInterp


def _raster(path: Path, interp: list[ColorInterp], descriptions: list[str] | None = None) -> str:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=32,
        height=32,
        count=len(interp),
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 6000000, 0.1, 0.1),
    ) as dst:
        dst.write(np.zeros((len(interp), 32, 32), np.uint8))
        dst.colorinterp = interp
        for i, text in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, text)
    return str(path)


def test_a_bgrn_raster_gives_red_green_blue_to_an_rgb_model(tmp_path: Path, caplog) -> None:
    info = describe_raster(
        _raster(
            tmp_path / "bgrn.tif",
            [CI.blue, CI.green, CI.red, CI.undefined],
            ["B2", "B3", "B4", "B8"],
        )
    )
    assert info.colorinterp == ("blue", "green", "red", "undefined")
    with caplog.at_level(logging.INFO, logger="mgpr.geo.bands"):
        assert check_bands(info, None, 3) == [3, 2, 1]
    assert "by colour interpretation" in caplog.text


def test_bands_by_name_description_or_index(tmp_path: Path) -> None:
    info = describe_raster(
        _raster(
            tmp_path / "s2.tif", [CI.blue, CI.green, CI.red, CI.undefined], ["B2", "B3", "B4", "B8"]
        )
    )
    assert check_bands(info, ["b8", "Red", "GREEN"], 3) == [4, 3, 2]
    assert check_bands(info, ["B8", 3, "green"], 3) == [4, 3, 2]
    with pytest.raises(ConfigError, match=r"'nir' matches no band of .*\(its bands: 1:B2/blue"):
        check_bands(info, ["nir", "red", "green"], 3)
    with pytest.raises(ConfigError, match="names band 7, but .* has 4 band"):
        check_bands(info, [7, 1, 2], 3)


def test_two_bands_with_one_name_must_be_picked_by_index(tmp_path: Path) -> None:
    info = describe_raster(_raster(tmp_path / "nn.tif", [CI.undefined] * 3, ["nir", "nir", "red"]))
    with pytest.raises(ConfigError, match=r"'nir' matches bands \[1, 2\].*pick them by index"):
        check_bands(info, ["nir"], 0)


def test_alpha_is_never_model_input(tmp_path: Path) -> None:
    info = describe_raster(_raster(tmp_path / "rgba.tif", [CI.red, CI.green, CI.blue, CI.alpha]))
    assert check_bands(info, None, 0) == [1, 2, 3]  # band-agnostic model: every band but alpha
    assert check_bands(info, None, 3) == [1, 2, 3]
    # Named outright (band 4 taken for NIR, or by its name), it was read as imagery.
    for bands in ([4, 3, 2], ["alpha", "green", "blue"]):
        with pytest.raises(ConfigError, match=r"names band 4, which is .*alpha band .*1\.\.3$"):
            check_bands(info, bands, 3)
    with pytest.raises(ConfigError, match="alpha band"):
        check_bands(info, [1, 4], 0)


def test_a_paletted_raster_is_refused_with_the_expand_command(tmp_path: Path) -> None:
    path = write_paletted(tmp_path / "pal.tif")
    info = describe_raster(str(path))
    assert info.colorinterp == ("palette",)
    for bands, needed in ((None, 0), (None, 1), ([1, 1, 1], 3)):
        with pytest.raises(ConfigError, match=r"paletted image .*gdal_translate -expand rgb"):
            check_bands(info, bands, needed)


def test_untagged_bands_keep_the_first_ones(tmp_path: Path) -> None:
    info = describe_raster(_raster(tmp_path / "u.tif", [CI.undefined] * 4))
    assert check_bands(info, None, 3) == [1, 2, 3]
    assert check_bands(info, None, 0) == [1, 2, 3, 4]


def test_gcp_rasters_are_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "gcps.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8"
    ) as dst:
        dst.write(np.zeros((1, 32, 32), np.uint8))
        gcps = [
            GroundControlPoint(row=0, col=0, x=10.0, y=50.0),
            GroundControlPoint(row=0, col=32, x=10.1, y=50.0),
            GroundControlPoint(row=32, col=0, x=10.0, y=49.9),
        ]
        dst.gcps = (gcps, CRS.from_epsg(4326))
    info = describe_raster(str(path))
    assert info.crs_wkt is None and info.gcp_crs == "EPSG:4326"
    plain = describe_raster(_raster(tmp_path / "plain.tif", [CI.gray]))
    assert plain.gcp_crs is None


def test_the_fingerprint_message_names_the_band_list_that_differs() -> None:
    old = {
        "model": "m",
        "inputs": [{"path": "a.tif", "bands": [1, 2, 3]}, {"path": "b.tif", "bands": [1, 2, 3]}],
    }
    new = {
        "model": "m",
        "inputs": [{"path": "a.tif", "bands": [1, 2, 3]}, {"path": "b.tif", "bands": [3, 2, 1]}],
    }
    assert _first_difference(old, new) == (
        "inputs[1] ('b.tif').bands differs: was [1, 2, 3], now [3, 2, 1]"
    )


def test_the_fingerprint_message_names_the_rasters_added_or_gone() -> None:
    def run(*paths: str) -> dict:
        return {"model": "m", "inputs": [{"path": p, "bytes": 10, "bands": [1]} for p in paths]}

    assert _first_difference(run("a.tif", "b.tif", "c.tif"), run("a.tif", "d.tif")) == (
        "inputs differ: 3 raster(s) before, 2 now (2 no longer listed: 'b.tif', 'c.tif'; "
        "1 new: 'd.tif')"
    )
    many = [f"r{i}.tif" for i in range(6)]
    assert _first_difference(run(*many), run("r0.tif")).endswith(
        "(5 no longer listed: 'r1.tif', 'r2.tif', 'r3.tif' and 2 more)"
    )
    # the same files in another order are compared record by record, as before
    assert _first_difference(run("a.tif", "b.tif"), run("b.tif", "a.tif")) == (
        "inputs[0].path differs: was a.tif, now b.tif"
    )


def test_too_few_bands_suggests_a_bands_value_the_model_accepts(tmp_path: Path) -> None:
    """The example has as many entries as the model needs, so following it is not refused."""
    info = describe_raster(_raster(tmp_path / "rgb.tif", [CI.red, CI.green, CI.blue]))
    with pytest.raises(ConfigError, match=r"needs 4; pick bands with e\.g\. bands=\[1,2,3,3\] "):
        check_bands(info, None, 4)
    assert check_bands(info, [1, 2, 3, 3], 4) == [1, 2, 3, 3]  # the example itself runs
    gray = describe_raster(_raster(tmp_path / "g.tif", [CI.gray]))
    with pytest.raises(ConfigError, match=r"bands=\[1,1,1\] "):
        check_bands(gray, None, 3)
