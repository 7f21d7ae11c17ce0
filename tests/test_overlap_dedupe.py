"""Inputs that overlap on the ground: an object in both is reported once (the command, CPU).

One generated orthomosaic is cut into two GeoTIFFs that share a 300 px wide strip, as a tiled
orthophoto with margins is; the reference detector finds every planted object in each piece
that holds it. Without the pass between inputs the strip's objects came twice, and those cut by
a piece's edge came as a whole box and a truncated one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import shapely
from conftest import read_gpkg_layer, run_mgpr_inprocess
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from mgpr.tasks.overlap_dedupe import _duplicates


def _crop(src_path: Path, out: Path, col0: int, col1: int) -> Path:
    with rasterio.open(src_path) as src:
        window = Window(col0, 0, col1 - col0, src.height)
        profile = src.profile | {
            "width": col1 - col0,
            "transform": window_transform(window, src.transform),
        }
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return out


def test_objects_in_two_overlapping_inputs_are_reported_once(
    make_image, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    image = make_image("whole.tif", width=1100, height=512, objects=24, seed=7, overlap=64)
    folder = tmp_path / "sheets"
    folder.mkdir()
    _crop(image.path, folder / "west.tif", 0, 700)  # the sheets share columns 400..700
    _crop(image.path, folder / "east.tif", 400, 1100)
    run = tmp_path / "run"
    args = [
        f"input_path={folder}",
        "model=reference",
        "tile_size=256",
        "overlap=64",
        "workers=0",
        "accelerator=cpu",
        "progress=false",
        f"output_dir={run}",
    ]
    assert run_mgpr_inprocess(*args) == 0
    out = capsys.readouterr().out
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    with rasterio.open(image.path) as src:
        t = src.transform
    truth = [
        shapely.affinity.affine_transform(
            shapely.box(o.col_min, o.row_min, o.col_max, o.row_max), [t.a, t.b, t.d, t.e, t.c, t.f]
        )
        for o in image.objects
    ]
    in_strip = [o for o in image.objects if o.col_max > 400 and o.col_min < 700]
    assert len(in_strip) >= 3  # the case under test is there
    # Every planted object exactly once, with its whole footprint (not a truncated copy).
    assert len(geoms) == len(truth)
    for g in truth:
        matches = [f for f in geoms if f.intersects(g) and (f & g).area / (f | g).area > 0.99]
        assert len(matches) == 1, g.bounds
    summary = json.loads((run / "summary.json").read_text())
    assert summary["duplicates_across_inputs"] >= len(in_strip)
    assert "boxes found again where inputs overlap, removed" in out


def test_inputs_side_by_side_lose_nothing(make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Sheets that only touch: no overlap zone, every box stays (objects on the line are cut
    in two by the sheets themselves, as they are without the pass)."""
    image = make_image("whole.tif", width=1000, height=512, objects=16, seed=8, overlap=64)
    folder = tmp_path / "sheets"
    folder.mkdir()
    _crop(image.path, folder / "west.tif", 0, 500)
    _crop(image.path, folder / "east.tif", 500, 1000)
    run = tmp_path / "run"
    args = [f"input_path={folder}", "model=reference", "tile_size=256", "overlap=64"]
    args += ["workers=0", "accelerator=cpu", "progress=false", f"output_dir={run}"]
    assert run_mgpr_inprocess(*args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["duplicates_across_inputs"] == 0
    cut = sum(o.col_min < 500 < o.col_max for o in image.objects)
    assert summary["records"] == len(image.objects) + cut


def test_duplicate_rule_whole_box_wins_then_score() -> None:
    bounds = np.array(
        [
            [0, 0, 10, 10],  # raster 0, whole
            [0, 0, 6, 10],  # raster 1, cut copy of it (IoS 1)
            [20, 0, 30, 10],  # raster 0, lower score
            [20, 0, 30, 10.5],  # raster 1, higher score: wins
            [40, 0, 50, 10],  # raster 0, same place as the next but another class
            [40, 0, 50, 10],  # raster 1
            [60, 0, 70, 10],  # raster 0
            [61, 0, 71, 10],  # raster 0 too: same raster, never a pair here
        ],
        dtype=np.float64,
    )
    scores = np.array([0.5, 0.9, 0.6, 0.8, 0.9, 0.9, 0.7, 0.7])
    labels = np.array([1, 1, 1, 1, 1, 2, 1, 1])
    rasters = np.array([0, 1, 0, 1, 0, 1, 0, 0])
    cut = np.array([False, True, False, False, False, False, False, False])
    gone = _duplicates(bounds, scores, labels, rasters, cut, 0.5, 0.5)
    assert gone.tolist() == [False, True, True, False, False, False, False, False]


def test_on_equal_scores_the_exact_box_of_the_finer_raster_wins() -> None:
    """The reference detector's scores always tie: a reprojected copy's inflated bounding box
    (raster 0) must not beat the native raster's exact box (raster 1), nor a downsampled
    copy's box (raster 2, larger pixels) the original's (raster 3)."""
    bounds = np.array(
        [
            [-0.5, -0.5, 10.5, 10.5],  # raster 0: reprojected, the box's bounding box
            [0, 0, 10, 10],  # raster 1: native, exact
            [20, 0, 30.4, 10.4],  # raster 2: exact, 0.4 m pixels
            [20, 0, 30.1, 10.1],  # raster 3: exact, 0.1 m pixels: wins over the larger box
        ],
        dtype=np.float64,
    )
    scores = np.full(4, 0.9)
    labels = np.ones(4, dtype=np.int64)
    rasters = np.arange(4)
    cut = np.zeros(4, dtype=bool)
    exact = np.array([False, True, True, True])
    pixel_area = np.array([0.01, 0.01, 0.16, 0.01])
    gone = _duplicates(
        bounds, scores, labels, rasters, cut, 0.5, 0.5, exact=exact, pixel_area=pixel_area
    )
    assert gone.tolist() == [True, False, True, False]
    # Without the tie-breaks the larger boxes won: the rule the reasons above replace.
    assert _duplicates(bounds, scores, labels, rasters, cut, 0.5, 0.5).tolist() == [
        False,
        True,
        False,
        True,
    ]
    # A higher score still beats an exact box.
    higher = scores.copy()
    higher[0] = 0.95
    gone = _duplicates(
        bounds, higher, labels, rasters, cut, 0.5, 0.5, exact=exact, pixel_area=pixel_area
    )
    assert gone.tolist()[:2] == [False, True]
