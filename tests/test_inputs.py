"""input_path -> rasters: every file once, whatever names it is listed under."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import read_gpkg_layer, run_mgpr_inprocess

from mgpr.geo.inputs import drop_duplicate_files, resolve_inputs
from mgpr.geo.tiling import plan_tiles


def test_same_file_under_three_names_is_kept_once(make_image, tmp_path: Path, caplog) -> None:
    a = make_image("a.tif", width=64, height=64)
    b = make_image("b.tif", width=64, height=64)
    link = tmp_path / "link_to_a.tif"
    os.symlink(a.path, link)
    relative = os.path.relpath(a.path, tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{a.path}\n{b.path}\n{relative}\n{link}\n{a.path}\n")
    with caplog.at_level(logging.WARNING, logger="mgpr.geo.inputs"):
        paths = resolve_inputs(str(listing))
    assert paths == [str(a.path), str(b.path)]
    dup_lines = [r.getMessage() for r in caplog.records if "listed twice" in r.getMessage()]
    assert len(dup_lines) == 3
    assert all(f"same file as {a.path}" in line for line in dup_lines)


def test_a_folder_with_a_symlink_to_one_of_its_files(make_image, tmp_path: Path) -> None:
    a = make_image("a.tif", width=64, height=64)
    os.symlink(a.path, tmp_path / "z_copy.tif")
    assert resolve_inputs(str(tmp_path)) == [str(a.path)]


def test_distinct_files_with_equal_bytes_are_both_kept(make_image, tmp_path: Path) -> None:
    a = make_image("a.tif", width=64, height=64)
    copy = tmp_path / "copy.tif"
    copy.write_bytes(Path(a.path).read_bytes())
    assert drop_duplicate_files([str(a.path), str(copy)]) == [str(a.path), str(copy)]


def test_virtual_paths_are_compared_by_name() -> None:
    url = "/vsicurl/https://example.org/x.tif"
    assert drop_duplicate_files([url, url, url + "/"]) == [url]


@pytest.mark.slow
def test_a_raster_listed_twice_is_predicted_once(make_image, tmp_path: Path, capsys) -> None:
    img = make_image("ortho.tif", width=512, height=512, objects=6)
    listing = tmp_path / "twice.txt"
    listing.write_text(f"{img.path}\n{img.path}\n")
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={listing}",
        "model=reference",
        "tile_size=256",
        "overlap=64",
        "workers=0",
        f"output_dir={run}",
    )
    assert rc == 0, capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    planned_once = len(plan_tiles(str(img.path), 512, 512, 256, 64))
    assert summary["tiles_total"] == planned_once
    assert summary["tiles_predicted"] + summary["tiles_skipped_nodata"] == planned_once
    assert [i["path"] for i in summary["provenance"]["inputs"]] == [str(img.path)]
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert len(geoms) == 6
