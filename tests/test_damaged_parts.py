"""A part whose manifest or payload cannot be read is set aside and its tiles predicted again.

A truncated manifest crashed the resume at start-up (pyarrow's traceback, exit 1); a truncated
or deleted payload failed every re-run's merge on the same file, with advice to re-run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_mgpr_inprocess

from mgpr.outputs.parts_read import DAMAGED_DIR, list_parts, set_aside_damaged_parts
from mgpr.run.finish import demo_check


def _damage(part_file: Path, how: str) -> None:
    if how == "delete":
        part_file.unlink()
    else:
        with open(part_file, "r+b") as fh:
            fh.truncate(os.path.getsize(part_file) // 2)


@pytest.mark.parametrize(
    ("suffix", "how"),
    [(".records.parquet", "truncate"), (".manifest.parquet", "truncate"),
     (".records.parquet", "delete")],
)  # fmt: skip
def test_a_damaged_part_is_set_aside_and_its_tiles_predicted_again(
    make_image, tmp_path: Path, capsys, suffix: str, how: str
) -> None:
    img = make_image(width=600, height=500, objects=8, tile_size=256, overlap=64)
    run = tmp_path / "run"
    args = [f"input_path={img.path}", "model=reference", "tile_size=256", "overlap=64",
            "workers=0", f"output_dir={run}", "progress=false"]  # fmt: skip
    assert run_mgpr_inprocess(*args) == 0
    (part,) = list_parts(run)
    _damage(run / "parts" / f"{part.name}{suffix}", how)
    capsys.readouterr()
    assert run_mgpr_inprocess(*args) == 0
    err = capsys.readouterr().err
    assert f"set aside 1 damaged part(s) into {run}/parts/{DAMAGED_DIR}: part {part.name}" in err
    assert "Traceback" not in err
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == check["planted"] == len(img.objects), check
    assert check["duplicates"] == 0
    aside = {p.name for p in (run / "parts" / DAMAGED_DIR).iterdir()}
    assert f"{part.name}.manifest.parquet" in aside
    assert part.name not in {p.name for p in list_parts(run)}
    assert set_aside_damaged_parts(run) == []  # the new parts read: nothing more to set aside
