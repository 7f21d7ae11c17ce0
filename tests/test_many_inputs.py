"""A folder of many small inputs (image chips): headers in processes, shared with launched ranks,
and the merge's per-input costs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mgpr.errors import InputError
from mgpr.geo import headers
from mgpr.geo.headers import PARALLEL_MIN_INPUTS, describe_processes, describe_rasters
from mgpr.geo.raster import describe_raster
from mgpr.outputs import parts
from mgpr.outputs.features import read_features, write_features
from mgpr.outputs.vector import FeatureBatch
from mgpr.run import launched_headers
from mgpr.run.launched_headers import (
    HEADERS_ENV,
    HEADERS_FILE,
    input_headers,
    remove_shared_headers,
)
from mgpr.tasks.detection import DetectionTask
from tests.conftest import mgpr_cmd, read_gpkg_layer, run_mgpr_inprocess, subprocess_env


def _chips(make_image, n: int, size: int = 32) -> list[str]:
    """``n`` chips on a grid (different sizes and band counts, so headers differ)."""
    out = []
    for i in range(n):
        img = make_image(
            f"chips/c{i:04d}.tif",
            width=size + i % 3,
            height=size,
            bands=3 + i % 2,
            origin_x=500000.0 + (i % 20) * size * 0.1,
            origin_y=5000000.0 - (i // 20) * size * 0.1,
            objects=0,
        )
        out.append(str(img.path))
    return out


def test_headers_read_in_processes_equal_the_serial_ones_in_input_order(make_image) -> None:
    paths = _chips(make_image, 9)
    serial = [describe_raster(p) for p in paths]
    assert describe_rasters(paths, processes=3) == serial
    assert describe_rasters(paths[::-1], processes=2) == serial[::-1]
    # one CRS: one string for all (a WKT is most of a header, and the other ranks get a pickle)
    for processes in (1, 2):
        texts = {id(info.crs_wkt) for info in describe_rasters(paths, processes=processes)}
        assert len(texts) == 1


def test_the_first_unreadable_input_in_input_order_is_the_one_named(
    make_image, tmp_path: Path
) -> None:
    paths = _chips(make_image, 6)
    for name in ("bad1.tif", "bad2.tif"):
        (tmp_path / name).write_bytes(b"not a tiff")
    given = [*paths[:2], str(tmp_path / "bad1.tif"), *paths[2:], str(tmp_path / "bad2.tif")]
    headers.CHUNK, chunk = 2, headers.CHUNK  # several chunks, the bad ones in different ones
    try:
        with pytest.raises(InputError, match="bad1.tif"):
            describe_rasters(given, processes=2)
    finally:
        headers.CHUNK = chunk


def _killed(paths: list[str]) -> list[object]:
    os._exit(9)  # a header process the OOM killer took


def test_a_killed_header_process_falls_back_to_reading_here(
    make_image, monkeypatch, caplog
) -> None:
    paths = _chips(make_image, 4)
    monkeypatch.setattr(headers, "_describe_chunk", _killed)
    with caplog.at_level("WARNING", logger="mgpr.geo.headers"):
        assert describe_rasters(paths, processes=2) == [describe_raster(p) for p in paths]
    assert "header processes failed" in caplog.text


@pytest.mark.parametrize(
    ("n_inputs", "cpus", "expected"),
    [
        (PARALLEL_MIN_INPUTS - 1, 16, 1),  # few inputs: read here
        (PARALLEL_MIN_INPUTS, 1, 1),  # one CPU: read here
        (PARALLEL_MIN_INPUTS, 16, PARALLEL_MIN_INPUTS // headers.CHUNK),  # no idle process
        (100_000, 16, 16),  # one per usable CPU
    ],
)
def test_header_processes_follow_the_inputs_and_the_usable_cpus(
    n_inputs: int, cpus: int, expected: int
) -> None:
    assert describe_processes(n_inputs, cpus) == expected


def test_launched_ranks_take_rank_0s_headers_for_the_same_run_and_inputs(
    make_image, tmp_path: Path, monkeypatch
) -> None:
    paths = _chips(make_image, 4)
    run_dir = tmp_path / "run"
    monkeypatch.delenv(HEADERS_ENV, raising=False)
    monkeypatch.setattr(launched_headers, "PARALLEL_MIN_INPUTS", 3)
    found = input_headers(paths, run_dir, rank=0)
    assert os.environ[HEADERS_ENV] == str(run_dir / HEADERS_FILE)
    assert (run_dir / HEADERS_FILE).is_file()

    def no_read(paths: list[str]) -> list[object]:
        raise AssertionError("a launched rank read the headers again")

    monkeypatch.setattr(launched_headers, "describe_rasters", no_read)
    assert input_headers(paths, run_dir, rank=1) == found
    # Another input list or another run directory: the rank reads the headers itself.
    monkeypatch.setattr(launched_headers, "describe_rasters", lambda p: ["own"] * len(p))
    assert input_headers(paths[:3], run_dir, rank=1) == ["own"] * 3
    assert input_headers(paths, tmp_path / "other", rank=1) == ["own"] * 4
    # A damaged file: read them itself, never fail on it.
    (run_dir / HEADERS_FILE).write_bytes(b"\x80\x05 torn")
    assert input_headers(paths, run_dir, rank=1) == ["own"] * 4
    remove_shared_headers(run_dir)
    assert not (run_dir / HEADERS_FILE).exists() and HEADERS_ENV not in os.environ


def test_rank_0_shares_no_headers_for_few_inputs(make_image, tmp_path: Path, monkeypatch) -> None:
    paths = _chips(make_image, 2)
    monkeypatch.delenv(HEADERS_ENV, raising=False)
    input_headers(paths, tmp_path / "run", rank=0)
    assert HEADERS_ENV not in os.environ and not (tmp_path / "run" / HEADERS_FILE).exists()


def test_feature_files_are_published_whole_without_fsync(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(parts.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    rings = np.zeros((1, 5, 2))
    path = write_features(
        tmp_path / "merge" / "raster000000.features.parquet",
        FeatureBatch(rings, {"score": np.array([0.5])}),
        {"path": "a.tif"},
    )
    batch, meta = read_features(path)
    assert meta == {"path": "a.tif"} and len(batch) == 1
    assert synced == [] and [p.name for p in path.parent.iterdir()] == [path.name]
    # parts (results a resume reads) stay durable
    parts.publish_file(tmp_path / "part.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert len(synced) == 2


@pytest.mark.slow
def test_a_folder_of_chips_on_two_ranks_reads_the_headers_once(make_image, tmp_path: Path) -> None:
    paths = _chips(make_image, PARALLEL_MIN_INPUTS, size=24)
    run = tmp_path / "run"
    cmd = mgpr_cmd(
        f"input_path={Path(paths[0]).parent}",
        "model=reference",
        "tile_size=32",
        "batch_size=64",
        "workers=0",
        "gpus=2",
        "accelerator=cpu",
        "previews=none",
        f"output_dir={run}",
        "progress=false",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tiles_predicted"] == PARALLEL_MIN_INPUTS
    assert summary["tiles_missing"] == 0 and summary["duplicate_tiles"] == 0
    rank1 = (run / "logs" / "rank1.log").read_text()
    assert f"rank 1: the headers of {PARALLEL_MIN_INPUTS} inputs from rank 0" in rank1
    assert not (run / HEADERS_FILE).exists()  # removed once prediction ended
    assert not (run / "merge").exists()  # the merge's feature files, cleared


def test_chips_without_records_share_one_empty_feature_batch(
    make_image, tmp_path: Path, monkeypatch
) -> None:
    """The merge makes the features of a raster without records once, not once a raster; the
    layer still holds every chip's boxes, each under its own source."""
    found = {}
    for i in range(6):
        img = make_image(
            f"chips/c{i}.tif", width=64, height=64, objects=2 if i % 2 else 0, seam_share=0,
            object_max_px=12, origin_x=500000.0 + i * 10, seed=i,
        )  # fmt: skip
        found[str(img.path)] = 2 if i % 2 else 0
    calls: list[int] = []
    real = DetectionTask.features

    def counted(self, info, records, ctx, tiles):
        calls.append(records.num_rows)
        return real(self, info, records, ctx, tiles)

    monkeypatch.setattr(DetectionTask, "features", counted)
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={tmp_path / 'chips'}", "model=reference", "tile_size=64", "workers=0",
        "previews=none", f"output_dir={run}",
    )  # fmt: skip
    assert rc == 0
    assert sorted(calls) == [0, 2, 2, 2]  # 3 chips with boxes, the 3 empty ones made once
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    per_source = {p: sum(r["source"] == p for r in rows) for p in found}
    assert per_source == found
