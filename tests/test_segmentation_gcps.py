"""Class maps of inputs georeferenced by GCPs or RPCs carry them, so they overlay their input.

A scanned map or a satellite scene with GCPs / RPCs and no geotransform got a class map with
neither CRS nor transform (an identity grid, 0 GCPs): it could not be overlaid or warped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from conftest import run_mgpr_inprocess, segmentation_args
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.rpc import RPC

PROFILE = {"driver": "GTiff", "width": 300, "height": 200, "count": 3, "dtype": "uint8"}


def _image() -> np.ndarray:
    data = np.full((3, 200, 300), 40, np.uint8)
    data[:, 50:90, 60:140] = 250  # one bright patch: class 1 of the reference segmenter
    return data


def test_class_map_and_probabilities_keep_the_inputs_gcps(tmp_path: Path) -> None:
    gcps = [
        GroundControlPoint(row, col, 500000 + col * 0.1, 5000000 - row * 0.1, id=f"p{i}")
        for i, (row, col) in enumerate([(0, 0), (0, 300), (200, 0), (200, 300)])
    ]
    path = tmp_path / "scan.tif"
    with rasterio.open(path, "w", gcps=gcps, crs=CRS.from_epsg(32633), **PROFILE) as dst:
        dst.write(_image())
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*segmentation_args(path, run, "probabilities=true")) == 0
    for name in ("scan.tif", "scan_prob.tif"):
        with rasterio.open(run / "segmentation" / name) as src:
            got, crs = src.gcps
            assert crs == CRS.from_epsg(32633) and src.crs is None
            assert [(g.row, g.col, g.x, g.y) for g in got] == [
                (g.row, g.col, g.x, g.y) for g in gcps
            ]
    with rasterio.open(run / "segmentation" / "scan.tif") as src:
        assert (src.read(1)[50:90, 60:140] == 1).all()


def test_class_map_keeps_the_inputs_rpcs(tmp_path: Path) -> None:
    rpc = RPC(
        height_off=100, height_scale=50, lat_off=45, lat_scale=0.01, line_off=100,
        line_scale=100, long_off=12, long_scale=0.01, samp_off=150, samp_scale=150,
        line_den_coeff=[1] + [0] * 19, line_num_coeff=[0, 0, -1] + [0] * 17,
        samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18,
    )  # fmt: skip
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", rpcs=rpc, **PROFILE) as dst:
        dst.write(_image())
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*segmentation_args(path, run)) == 0
    with rasterio.open(run / "segmentation" / "scene.tif") as src, rasterio.open(path) as inp:
        assert src.rpcs is not None
        assert src.rpcs.to_gdal() == inp.rpcs.to_gdal()
