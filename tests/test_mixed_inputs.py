"""Inputs that used to hang a run: mixed band counts, and any exception inside a worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mgpr_cmd

from mgpr.data.batching import UniformShapeBatchSampler
from mgpr.geo.tiling import plan_tiles


def test_batches_are_cut_where_the_band_count_changes() -> None:
    keys = [3, 3, 3, 4, 4, 1, 1, 1, 1, 1, 3]
    batches = list(UniformShapeBatchSampler(keys, batch_size=4))
    assert batches == [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [10]]
    assert len(UniformShapeBatchSampler(keys, 4)) == 5
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))  # each index once
    assert list(UniformShapeBatchSampler([], 4)) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        UniformShapeBatchSampler(keys, 0)


@pytest.mark.slow
def test_rgb_rgba_and_one_band_rasters_with_a_band_agnostic_model(
    make_image, tmp_path: Path
) -> None:
    images = [
        make_image("rgb.tif", width=300, height=300, bands=3),
        make_image("rgba.tif", width=300, height=300, bands=4),
        make_image("one.tif", width=300, height=300, bands=1),
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{img.path}\n" for img in images))
    run = tmp_path / "run"
    proc = subprocess.run(
        mgpr_cmd(
            f"input_path={listing}",
            "model=null",
            "tile_size=128",
            "batch_size=4",
            "workers=2",
            f"output_dir={run}",
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    planned = sum(len(plan_tiles(str(i.path), 300, 300, 128, 0)) for i in images)
    assert summary["tiles_total"] == planned == summary["tiles_predicted"]


_RAISING_WORKER = """
import sys
from mgpr.data.dataset import TileDataset

def broken(self, indices):
    raise RuntimeError("boom: decoder state lost")

TileDataset.__getitems__ = broken  # workers fork from here, so they inherit it
from mgpr.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_an_exception_in_a_worker_is_one_line_and_never_a_hang(make_image, tmp_path: Path) -> None:
    img = make_image("ortho.tif", width=256, height=256)
    script = tmp_path / "raising_worker.py"
    script.write_text(_RAISING_WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            f"input_path={img.path}",
            "model=null",
            "tile_size=128",
            "workers=2",
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,  # the old behaviour: a hang at exit, forever
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mgpr: error:")]
    assert len(errors) == 1
    assert (
        "a DataLoader worker of rank 0 failed: RuntimeError: boom: decoder state lost"
        in (errors[0])
    )
    assert "workers=0" in errors[0]
    assert "Traceback" not in proc.stderr
