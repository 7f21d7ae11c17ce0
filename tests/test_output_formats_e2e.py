"""``output_format`` end to end: the ``mgpr`` command on generated rasters (CPU, one rank)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import shapely
from conftest import read_gpkg_layer, run_mgpr_inprocess
from geoparquet_helpers import read_geoparquet


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _detect(img_path: Path, run: Path, *extra: str) -> int:
    return run_mgpr_inprocess(
        f"input_path={img_path}",
        "model=reference",
        "tile_size=128",
        "overlap=32",
        "workers=0",
        "progress=false",
        f"output_dir={run}",
        *extra,
    )


def _same_features(gpkg: Path, parquet: Path, layer: str) -> int:
    """Assert both files hold the same features in the same order; returns how many."""
    g_geoms, g_rows, srs = read_gpkg_layer(gpkg, layer)
    p_geoms, table, crs, _ = read_geoparquet(parquet)
    assert len(g_geoms) == len(p_geoms)
    assert shapely.equals(g_geoms, p_geoms).all()
    for row in g_rows:
        row.pop("fid")
    assert table.to_pylist() == g_rows
    if crs is None:
        assert srs in (-1, 0)  # GeoPackage's undefined Cartesian / geographic SRS
    else:
        assert crs.to_epsg() == srs
    return len(g_geoms)


def test_both_writes_a_geopackage_and_geoparquet_with_the_same_features(
    make_image, tmp_path: Path
) -> None:
    img = make_image(width=500, height=400, objects=8, tile_size=128, overlap=32)
    run = tmp_path / "run"
    assert _detect(img.path, run, "output_format=both") == 0
    s = _summary(run)
    gpkg, parquet = run / "predictions.gpkg", run / "detections.parquet"
    preview = str(run / "preview.png")
    assert s["outputs"] == [str(gpkg), str(parquet), preview] and s["output"] == str(gpkg)
    n = _same_features(gpkg, parquet, "detections")
    assert n == s["records"] == s["layers"]["detections"] > 0
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]


def test_parquet_alone_and_a_raster_without_crs(make_image, tmp_path: Path) -> None:
    img = make_image(width=300, height=256, objects=4, crs=None, tile_size=128, overlap=32)
    run = tmp_path / "run"
    assert _detect(img.path, run, "output_format=parquet") == 0
    s = _summary(run)
    parquet = run / "detections.parquet"
    assert (
        s["outputs"] == [str(parquet), str(run / "preview.png")]
        and not (run / "predictions.gpkg").exists()
    )
    geoms, table, crs, geo = read_geoparquet(parquet)
    assert crs is None and geo["columns"]["geometry"]["crs"] is None
    assert len(geoms) == s["records"] > 0
    # Pixel coordinates: the geometry's bounds are the box's pixel corners (y = row).
    px = np.stack(
        [table.column(k).to_numpy() for k in ("px_xmin", "px_ymin", "px_xmax", "px_ymax")], 1
    )
    assert (shapely.bounds(geoms) == px).all()


def test_output_format_is_not_part_of_the_run_identity(make_image, tmp_path: Path) -> None:
    """It only changes the merge: a finished GeoPackage run re-run as GeoParquet resumes (no
    tile predicted again) and writes the same features, instead of being refused."""
    img = make_image(width=400, height=300, objects=6, tile_size=128, overlap=32)
    run = tmp_path / "run"
    assert _detect(img.path, run) == 0
    assert _summary(run)["outputs"] == [str(run / p) for p in ("predictions.gpkg", "preview.png")]
    assert _detect(img.path, run, "output_format=parquet") == 0
    log = (run / "logs" / "rank0.log").read_text()
    assert re.search(r"(\d+) of the \1 planned tiles were finished", log), log[-2000:]
    _same_features(run / "predictions.gpkg", run / "detections.parquet", "detections")
    # The GeoPackage is no longer this run's output: kept (a user may have it open), named.
    assert "1 file(s) an earlier run of this job wrote are not this run's outputs" in log
    assert "(predictions.gpkg): this run writes another output_format (output_format=both" in log
    assert _summary(run)["stale_outputs"] == [str(run / "predictions.gpkg")]
    assert _detect(img.path, run, "output_format=parquet") == 0  # named until it is gone
    assert _summary(run)["stale_outputs"] == [str(run / "predictions.gpkg")]
    (run / "predictions.gpkg").unlink()
    assert _detect(img.path, run, "output_format=parquet") == 0
    assert "stale_outputs" not in _summary(run)


def test_quick_start_checks_its_planted_objects_from_geoparquet(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"output_dir={run}", "image_size=512", "objects=6", "workers=0", "output_format=parquet"
    )
    assert rc == 0
    check = _summary(run)["demo_check"]
    assert check["planted"] == check["found"] == 6 and check["duplicates"] == 0


def test_layers_renamed_by_output_crs_are_said_to_be_renamed(make_image, tmp_path: Path) -> None:
    """Two CRSs give a layer each; output_crs= then writes one: the earlier layer files are
    stale for that reason, and the line said to use output_format=both, which was in use."""
    folder = tmp_path / "orthos"
    make_image("orthos/a.tif", width=256, height=256, objects=2)
    make_image("orthos/b.tif", width=256, height=256, objects=2, crs="EPSG:32632", seed=1)
    run = tmp_path / "run"
    assert _detect(folder, run, "output_format=parquet") == 0
    assert _detect(folder, run, "output_format=parquet", "output_crs=EPSG:4326") == 0
    log = (run / "logs" / "rank0.log").read_text()
    assert "2 file(s) an earlier run of this job wrote are not this run's outputs" in log
    assert "their layers have other names now (output_crs= puts every input's features" in log
