"""Shards, durable progress, seam de-duplication and the merged GeoPackage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_gpkg_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.outputs.shards import (
    ShardStore,
    TileOutcome,
    dedupe_seam_boxes,
    finished_tile_keys,
    merge_run,
    shard_path,
    tile_statuses,
)


def _write(
    run_dir: Path, rank: int, outcomes: list[TileOutcome], rasters, task: str, overlap: int
) -> None:
    store = ShardStore(shard_path(run_dir, rank), rank)
    store.write(outcomes, rasters, overlap, task)
    store.close()


def test_dedupe_prefers_the_whole_box_over_its_cut_copy() -> None:
    boxes = np.array(
        [
            [100, 10, 140, 30],  # whole object seen by tile 1
            [100, 10, 128, 30],  # the same object cut by tile 0's right edge
            [300, 10, 320, 30],
        ],  # another object
        dtype=np.float64,
    )
    keep = dedupe_seam_boxes(
        boxes,
        np.array([0.9, 0.95, 0.8]),
        np.array([1, 1, 1]),
        np.array([1, 0, 0]),
        np.array([False, True, False]),
        0.5,
        0.5,
    )
    assert keep.tolist() == [True, False, True]


def test_dedupe_keeps_overlapping_boxes_of_other_classes_and_same_tile() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 9, 9]], dtype=np.float64)
    keep = dedupe_seam_boxes(
        boxes,
        np.array([0.9, 0.8, 0.7]),
        np.array([1, 2, 1]),
        np.array([0, 1, 0]),
        np.zeros(3, bool),
        0.99,
        0.5,
    )
    assert keep.tolist() == [True, True, True]


def test_shard_marks_tiles_done_with_their_records(make_image, tmp_path: Path) -> None:
    info = describe_raster(str(make_image(width=256, height=256).path))
    tiles = plan_tiles(info.path, 256, 256, 128, 0)
    run = tmp_path / "run"
    outcomes = [
        TileOutcome(
            tiles[0],
            0,
            "",
            np.array([[1, 2, 11, 12]], np.float32),
            np.array([0.9], np.float32),
            np.array([1]),
        ),
        TileOutcome(tiles[1], 1),
        TileOutcome(tiles[2], 2, "IOError: bad block"),
    ]
    _write(run, 0, outcomes, {info.path: info}, "detection", 0)
    statuses = tile_statuses(run)
    assert statuses[tiles[0].id.key()][0] == "done"
    assert statuses[tiles[2].id.key()] == ("failed", "IOError: bad block")
    assert finished_tile_keys(run) == {tiles[0].id.key(), tiles[1].id.key()}
    # A later success of the failed tile wins.
    _write(
        run,
        1,
        [
            TileOutcome(
                tiles[2],
                0,
                "",
                np.zeros((0, 4), np.float32),
                np.zeros(0, np.float32),
                np.zeros(0, np.int64),
            )
        ],
        {info.path: info},
        "detection",
        0,
    )
    assert tile_statuses(run)[tiles[2].id.key()][0] == "done"


def test_merge_detections_georeferenced_and_readable_without_gdal(
    make_image, tmp_path: Path
) -> None:
    info = describe_raster(str(make_image(width=256, height=200).path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 32)  # stride 96
    run = tmp_path / "run"
    # Object at raster px x 100..130, y 10..30: whole in tile (0,1) [96..224),
    # cut in tile (0,0) [0..128).
    t00, t01 = tiles[0], tiles[1]
    outcomes = [
        TileOutcome(
            t00,
            0,
            "",
            np.array([[100, 10, 128, 30]], np.float32),
            np.array([0.99], np.float32),
            np.array([1]),
        ),
        TileOutcome(
            t01,
            0,
            "",
            np.array([[4, 10, 34, 30]], np.float32),
            np.array([0.9], np.float32),
            np.array([1]),
        ),
    ]
    _write(run, 0, outcomes[:1], {info.path: info}, "detection", 32)
    _write(run, 1, outcomes[1:], {info.path: info}, "detection", 32)
    result = merge_run(run, [info], "detection", 128, 32, ("bg", "thing"), 0.5, 0.5)
    assert result.records == 1 and result.duplicates_removed == 1
    geoms, rows, epsg = read_gpkg_layer(result.output_path, "detections")
    assert epsg == 32633
    assert rows[0]["label"] == "thing" and rows[0]["tile_col"] == 1
    t = info.transform
    expected = (t.c + 100 * t.a, t.f + 30 * t.e, t.c + 130 * t.a, t.f + 10 * t.e)
    np.testing.assert_allclose(geoms[0].bounds, expected, atol=1e-6)


def test_merge_classification_footprints_equal_tile_windows(make_image, tmp_path: Path) -> None:
    info = describe_raster(str(make_image(width=300, height=200).path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 0)
    run = tmp_path / "run"
    outs = [
        TileOutcome(t, 0, "", None, np.array([0.7, 0.2], np.float32), np.array([3, 1]))
        for t in tiles
    ]
    _write(run, 0, outs, {info.path: info}, "classification", 0)
    result = merge_run(run, [info], "classification", 128, 0, None, 0.5, 0.5, topk=2)
    geoms, rows, _ = read_gpkg_layer(result.output_path, "classifications")
    assert len(geoms) == len(tiles)
    by_key = {r["tile_key"]: g for r, g in zip(rows, geoms, strict=True)}
    import rasterio.windows

    from mgpr.geo.tiling import valid_window

    for tile in tiles:
        left, bottom, right, top = rasterio.windows.bounds(valid_window(tile), info.transform)
        np.testing.assert_allclose(
            by_key[tile.id.key()].bounds, (left, bottom, right, top), atol=1e-6
        )
    assert rows[0]["class_id_1"] == 3 and rows[0]["class_id_2"] == 1


def test_merge_replaces_output_atomically(make_image, tmp_path: Path) -> None:
    info = describe_raster(str(make_image(width=128, height=128).path))
    tiles = plan_tiles(info.path, 128, 128, 128, 0)
    run = tmp_path / "run"
    _write(
        run,
        0,
        [TileOutcome(tiles[0], 0, "", None, np.array([1.0], np.float32), np.array([0]))],
        {info.path: info},
        "classification",
        0,
    )
    merge_run(run, [info], "classification", 128, 0, None, 0.5, 0.5, topk=1)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [] and (run / "predictions.gpkg").exists()


@pytest.mark.parametrize("n_tiles", [4, 64])
def test_shard_size_grows_linearly_not_memory(make_image, tmp_path: Path, n_tiles: int) -> None:
    """Each batch is one transaction; the store holds no per-tile state in memory."""
    info = describe_raster(str(make_image(width=64 * 8, height=64 * 8).path))
    tiles = plan_tiles(info.path, info.height, info.width, 64, 0)[:n_tiles]
    store = ShardStore(shard_path(tmp_path, 0), 0)
    for t in tiles:
        store.write(
            [TileOutcome(t, 0, "", None, np.array([1.0], np.float32), np.array([0]))],
            {info.path: info},
            0,
            "classification",
        )
    assert not hasattr(store, "_pending")
    store.close()
    assert len(finished_tile_keys(tmp_path)) == n_tiles


@settings(max_examples=60)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 60))
def test_grouped_dedupe_equals_one_global_pass(seed: int, n: int) -> None:
    """Splitting into groups of intersecting boxes changes nothing (a box only suppresses
    boxes it intersects)."""
    from mgpr.outputs.shards import _dedupe_group

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, n).round(2)
    labels = rng.integers(0, 2, n)
    tiles = rng.integers(0, 4, n)
    cut = rng.uniform(0, 1, n) < 0.3
    grouped = dedupe_seam_boxes(boxes, scores, labels, tiles, cut, 0.5, 0.5)
    if n:
        whole = _dedupe_group(boxes, scores, labels, tiles, cut, 0.5, 0.5)
        assert grouped.tolist() == whole.tolist()
