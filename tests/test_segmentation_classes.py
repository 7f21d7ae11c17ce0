"""Per-class totals of segmentation runs: each class's pixels and ground area, from the tiles.

The totals are counted tile by tile (:mod:`mgpr.tasks.segmentation_classes`), never by a pass
over the final class map, so every check here compares them with that map, read back.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from conftest import read_gpkg_layer, run_mgpr_inprocess, segmentation_args, web_mercator_y
from rasterio.errors import NotGeoreferencedWarning

from mgpr.outputs.parts import MANIFEST_META_KEY, MANIFEST_SUFFIX, parts_dir
from mgpr.tasks.segmentation_classes import CLASSES_SUFFIX

NAMES = ("background", "bright")


def _histogram(cog: Path) -> dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the no-CRS raster's map
        with rasterio.open(cog) as src:
            ids = src.read(1)
    hist = np.bincount(ids[ids != 255], minlength=len(NAMES))
    return {name: int(n) for name, n in zip(NAMES, hist, strict=True) if n}


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_web_mercator_areas_follow_the_latitude_of_each_tile(
    make_image, tmp_path: Path, capsys
) -> None:
    """A 12.8 km EPSG:3857 raster at 60 N: a CRS metre is 0.5 ground metres there, and the
    pixel area changes by 0.35 % from its south to its north edge. The totals equal the
    geodesic areas of the class map's polygons (vectorize=true) to the scale's change across
    one tile (2.56 km: 7e-4; a class spread over many tiles averages it out to 3e-5)."""
    img = make_image(
        width=640,
        height=640,
        objects=30,
        crs="EPSG:3857",
        pixel_size=20.0,
        origin_x=1113195.0,
        origin_y=web_mercator_y(60.0),
    )
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*segmentation_args(Path(img.path), run, "vectorize=true")) == 0
    out = capsys.readouterr().out
    classes = _summary(run)["classes"]
    assert {k: v["pixels"] for k, v in classes.items()} == _histogram(
        run / "segmentation" / "ortho.tif"
    )
    _geoms, rows, _srs = read_gpkg_layer(run / "predictions.gpkg", "segments")
    for name, entry in classes.items():
        mine = [r["area_m2"] for r in rows if r["label"] == name]
        assert entry["polygons"] == len(mine)
        geodesic = float(sum(mine))
        assert entry["area_m2"] == pytest.approx(geodesic, rel=1e-4)  # measured 3e-5
        # about a quarter of the grid's square metres (2 x 2 CRS metres per ground metre)
        assert entry["area_m2"] == pytest.approx(entry["pixels"] * 400.0 / 4, rel=0.01)
    line = next(ln for ln in out.splitlines() if ln.startswith("  classes"))
    assert line.startswith("  classes      by ground area: background ")


@pytest.mark.slow
def test_a_raster_without_crs_is_counted_in_pixels(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=300, height=260, objects=5, crs="none", nodata="border")
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*segmentation_args(Path(img.path), run)) == 0
    out = capsys.readouterr().out
    classes = _summary(run)["classes"]
    want = _histogram(run / "segmentation" / "ortho.tif")
    assert classes == {k: {"pixels": n} for k, n in want.items()}  # no area without a CRS
    total = sum(want.values())
    line = next(ln for ln in out.splitlines() if ln.startswith("  classes"))
    assert line == (
        f"  classes      by pixels: background {want['background']:,} "
        f"({want['background'] / total:.1%}), bright {want['bright']:,} "
        f"({want['bright'] / total:.1%})"
    )


@pytest.mark.slow
def test_parts_without_counts_give_no_totals_rather_than_short_ones(
    make_image, tmp_path: Path, capsys
) -> None:
    """A run directory whose parts an older mgpr wrote (no ``.classes.parquet``) resumes; its
    totals would miss those tiles, so the summary has none (and the class map is unchanged)."""
    img = make_image(width=300, height=260, objects=5)
    run = tmp_path / "run"
    args = segmentation_args(Path(img.path), run)
    assert run_mgpr_inprocess(*args) == 0
    assert _summary(run)["classes"]
    cog = run / "segmentation" / "ortho.tif"
    before = _histogram(cog)
    for manifest in parts_dir(run).glob(f"*{MANIFEST_SUFFIX}"):
        table = pq.read_table(manifest)
        meta = json.loads(table.schema.metadata[MANIFEST_META_KEY])
        for name in [f for f in meta["files"] if f.endswith(CLASSES_SUFFIX)]:
            (parts_dir(run) / name).unlink()
        meta["files"] = [f for f in meta["files"] if not f.endswith(CLASSES_SUFFIX)]
        schema = table.schema.with_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
        pq.write_table(table.cast(schema), manifest)
    capsys.readouterr()
    assert run_mgpr_inprocess(*args) == 0
    out = capsys.readouterr().out
    summary = _summary(run)
    assert summary["tiles_this_run"] == 0 and summary["classes"] == {}
    assert not any(ln.startswith("  classes") for ln in out.splitlines())
    assert _histogram(cog) == before
