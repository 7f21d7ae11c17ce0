"""What a raster without map coordinates is told: the command that fits how it IS referenced.

GCPs: warp by them into their own CRS; RPCs (a satellite scene before orthorectification):
``gdalwarp -rpc``; nothing: assign a CRS. Before, a GCP raster under output_crs was told it "has
no CRS", and an RPC scene under gsd= to assign corners with gdal_translate -a_ullr.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.rpc import RPC

from mgpr.errors import InputError
from mgpr.geo.gsd import check_gsd_crs
from mgpr.geo.raster import describe_raster
from mgpr.geo.reproject import check_output_crs
from mgpr.geo.values import carrier_dtype
from mgpr.run.input_warnings import warn_ungeoreferenced

PROFILE = {"driver": "GTiff", "width": 64, "height": 48, "count": 1, "dtype": "uint8"}
RPCS = RPC(
    height_off=100, height_scale=50, lat_off=45, lat_scale=0.01, line_off=24, line_scale=24,
    long_off=12, long_scale=0.01, samp_off=32, samp_scale=32,
    line_den_coeff=[1] + [0] * 19, line_num_coeff=[0, 0, -1] + [0] * 17,
    samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18,
)  # fmt: skip


def _write(path: Path, **georef: object) -> str:
    with rasterio.open(path, "w", **PROFILE, **georef) as dst:
        dst.write(np.zeros((1, 48, 64), np.uint8))
    return str(path)


def test_gcp_raster_is_told_to_warp_by_its_gcps_into_their_crs(tmp_path: Path) -> None:
    gcps = [GroundControlPoint(r, c, 500000 + c, 5000000 - r) for r, c in [(0, 0), (48, 64)]]
    info = describe_raster(_write(tmp_path / "g.tif", gcps=gcps, crs=CRS.from_epsg(32633)))
    with pytest.raises(InputError) as err:
        check_output_crs([info], "EPSG:4326")
    assert "is georeferenced by GCPs (EPSG:32633), not a transform" in str(err.value)
    assert f"`gdalwarp -t_srs EPSG:32633 {info.path} warped.tif`" in str(err.value)
    with pytest.raises(InputError, match="gdalwarp -t_srs EPSG:32633"):
        check_gsd_crs(info, 0.5)


def test_rpc_scene_is_told_to_orthorectify(tmp_path: Path, caplog) -> None:
    info = describe_raster(_write(tmp_path / "r.tif", rpcs=RPCS))
    assert info.has_rpcs and info.crs_wkt is None
    with caplog.at_level(logging.WARNING, logger="mgpr"):
        warn_ungeoreferenced([info])
    assert "is georeferenced by RPCs only" in caplog.text and "gdalwarp -rpc" in caplog.text
    assert "has no CRS" not in caplog.text
    with pytest.raises(InputError) as err:
        check_gsd_crs(info, 0.5)
    assert "gdalwarp -rpc -t_srs" in str(err.value) and "a_ullr" not in str(err.value)
    with pytest.raises(InputError, match="is georeferenced by RPCs only"):
        check_output_crs([info], "EPSG:4326")


def test_complex_raster_is_told_to_take_its_amplitude() -> None:
    with pytest.raises(InputError) as err:
        carrier_dtype([("sar.tif", "complex64")])
    assert '--calc="abs(A)"' in str(err.value) and "only the real part" in str(err.value)
