"""GeoTIFFs whose NBITS declares fewer bits than their dtype: 1-bit uint8, 12-bit uint16.

A 1-bit file (a mask, a scanned line map) is uint8 to every reader with values 0..1: read by the
uint8 default [0, 255] it reached the model as black (0 of 8 objects found, no warning).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_mgpr_inprocess

from mgpr.errors import ConfigError
from mgpr.geo.raster import describe_raster
from mgpr.geo.values import resolve_value_range
from mgpr.run.finish import demo_check


def _bits_copy(src_path: Path, dst_path: Path, nbits: int, dtype: str, bands: int = 3) -> None:
    """``src_path``'s bright pixels (every band >= 245) as 0/top values written with NBITS."""
    with rasterio.open(src_path) as src:
        bright = (src.read().min(axis=0) >= 245).astype(dtype)
        profile = src.profile
    profile.update(dtype=dtype, nbits=nbits, nodata=None, count=bands)
    profile.pop("photometric", None)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(np.repeat(bright[None] * (2**nbits - 1), bands, axis=0))


@pytest.mark.parametrize("bands", [3, 1])
def test_one_bit_uint8_is_read_by_its_bits(make_image, tmp_path: Path, bands: int) -> None:
    """Read by [0, 1]; one band included, whose black/white colour table (GDAL gives every
    one-band 1-bit GeoTIFF one) is not a palette to refuse."""
    img = make_image("rgb.tif", width=600, height=500, objects=8, tile_size=256, overlap=64)
    path = tmp_path / "bits.tif"
    _bits_copy(img.path, path, 1, "uint8", bands=bands)
    info = describe_raster(str(path))
    assert (info.dtype, info.nbits) == ("uint8", 1)
    assert resolve_value_range(info, [1] * bands, None).hi == (1.0,) * bands
    if bands == 1:
        assert info.colorinterp == ("palette",)
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={path}", "model=reference", "tile_size=256", "overlap=64", "workers=0",
        f"output_dir={run}",
    )  # fmt: skip
    assert code == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == check["planted"] == len(img.objects), check


def test_twelve_bit_uint16_range_is_checked_against_its_bits(make_image, tmp_path: Path) -> None:
    img = make_image("rgb.tif", width=300, height=200, objects=2)
    path = tmp_path / "b12.tif"
    _bits_copy(img.path, path, 12, "uint16")
    info = describe_raster(str(path))
    assert info.nbits == 12
    with pytest.raises(ConfigError, match=r"NBITS=12: values 0\.\.4095\) and mgpr does not"):
        resolve_value_range(info, [1, 2, 3], None)
    # the dtype's full span over 12-bit data: a sliver of the model's input, refused
    with pytest.raises(ConfigError, match=r"\(uint16 with NBITS=12: values 0\.\.4095\) lies 94%"):
        resolve_value_range(info, [1, 2, 3], [[0, 65535]])
    assert resolve_value_range(info, [1, 2, 3], [[0, 4095]]).hi == (4095.0,) * 3
    plain = describe_raster(str(img.path))
    assert plain.nbits is None
