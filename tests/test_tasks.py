"""The Task seam: per-tile records, seam de-duplication and the merged vector layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_gpkg_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpr.errors import ModelError
from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Classification, Detections
from mgpr.outputs.parts import PartWriter
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome
from mgpr.tasks.merge import merge_run
from mgpr.tasks.seam_dedupe import _dedupe_group, dedupe_seam_boxes


def det(boxes, scores, labels) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(scores, np.float32),
        np.asarray(labels, np.int64),
    )


def cls(ids, scores) -> Classification:
    return Classification(np.asarray(ids, np.int64), np.asarray(scores, np.float32))


def publish(run: Path, rank: int, task_name: str, ctx: TaskContext, outcomes) -> None:
    task = get_task(task_name)
    PartWriter(run, rank, lambda outs, sink: task.write_payload(outs, ctx, sink)).publish(outcomes)


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


def test_detection_records_clip_flag_and_shift_to_raster_pixels(make_image) -> None:
    info = describe_raster(str(make_image(width=256, height=200).path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 32)  # stride 96
    ctx = TaskContext({info.path: info}, 128, 32)
    t01 = tiles[1]  # window x 96..224, y 0..128
    outs = [
        TileOutcome(t01, 0, "", det([[4, 10, 34, 30], [60, 60, 70, 70]], [0.9, 0.8], [1, 2])),
        TileOutcome(tiles[0], 1),  # empty: no records
        TileOutcome(tiles[2], 2, "IOError"),
    ]
    table = get_task("detection").records(outs, ctx)
    rows = table.to_pylist()
    assert [r["tile_key"] for r in rows] == [t01.id.key()] * 2
    assert (rows[0]["x0"], rows[0]["y0"], rows[0]["x1"], rows[0]["y1"]) == (100, 10, 130, 30)
    assert rows[0]["seam"] and not rows[1]["seam"]  # in the left overlap strip / inside


def test_task_refuses_a_record_of_another_task(make_image, tmp_path: Path) -> None:
    info = describe_raster(str(make_image(width=128, height=128).path))
    (tile,) = plan_tiles(info.path, 128, 128, 128, 0)
    ctx = TaskContext({info.path: info}, 128, 0)
    with pytest.raises(TypeError, match="expects Detections"):
        publish(tmp_path, 0, "detection", ctx, [TileOutcome(tile, 0, "", cls([1], [0.5]))])


def test_unknown_task_is_one_line() -> None:
    with pytest.raises(ModelError, match="classification, detection, embedding, segmentation"):
        get_task("regression")


def test_merge_detections_georeferenced_and_readable_without_gdal(
    make_image, tmp_path: Path
) -> None:
    info = describe_raster(str(make_image(width=256, height=200).path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 32)  # stride 96
    run = tmp_path / "run"
    ctx = TaskContext({info.path: info}, 128, 32, ("bg", "thing"), 0.5, 0.5)
    # Object at raster px x 100..130, y 10..30: whole in tile (0,1) [96..224),
    # cut in tile (0,0) [0..128).
    publish(
        run,
        0,
        "detection",
        ctx,
        [TileOutcome(tiles[0], 0, "", det([[100, 10, 128, 30]], [0.99], [1]))],
    )
    publish(
        run, 1, "detection", ctx, [TileOutcome(tiles[1], 0, "", det([[4, 10, 34, 30]], [0.9], [1]))]
    )
    others = [TileOutcome(t, 1) for t in tiles[2:]]
    publish(run, 1, "detection", ctx, others)
    result = merge_run(run, get_task("detection"), ctx, tiles)
    assert result.records == 1 and result.duplicates_removed == 1
    assert result.tiles_done == 2 and result.tiles_empty == len(tiles) - 2
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
    ctx = TaskContext({info.path: info}, 128, 0, None, topk=2)
    publish(
        run,
        0,
        "classification",
        ctx,
        [TileOutcome(t, 0, "", cls([3, 1], [0.7, 0.2])) for t in tiles],
    )
    result = merge_run(run, get_task("classification"), ctx, tiles)
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
    ctx = TaskContext({info.path: info}, 128, 0, None, topk=1)
    publish(run, 0, "classification", ctx, [TileOutcome(tiles[0], 0, "", cls([0], [1.0]))])
    merge_run(run, get_task("classification"), ctx, tiles)
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [] and (run / "predictions.gpkg").exists()


@settings(max_examples=60)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 60))
def test_grouped_dedupe_equals_one_global_pass(seed: int, n: int) -> None:
    """Splitting into groups of intersecting boxes changes nothing (a box only suppresses
    boxes it intersects)."""
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


def test_tally_classes_counts_labels_under_the_given_key() -> None:
    import numpy as np
    import shapely

    from mgpr.outputs.vector import FeatureBatch
    from mgpr.tasks.base import tally_classes

    geoms = np.array([shapely.box(0, 0, 1, 1)] * 3, dtype=object)
    labels = np.array(["tree", "road", "tree"], dtype=object)
    totals: dict[str, dict[str, float]] = {}
    tally_classes(totals, FeatureBatch.of_geometries(geoms, {"label": labels}))
    assert totals == {"tree": {"count": 2}, "road": {"count": 1}}
    area = np.array([10.0, np.nan, 5.0])
    batch = FeatureBatch.of_geometries(geoms, {"label": labels, "area_m2": area})
    tally_classes(totals, batch)  # detections: counted only, whatever their area
    assert totals["tree"] == {"count": 4}
    totals["tree"]["pixels"] = 7  # a class map's own totals (segmentation_classes)
    tally_classes(totals, batch, count_key="polygons")  # vectorize=true adds its polygons
    assert totals["tree"] == {"count": 4, "pixels": 7, "polygons": 2}
    assert totals["road"] == {"count": 2, "polygons": 1}
    top1 = {"label_1": np.array(["forest", "forest"], dtype=object)}  # a classifier's tiles
    tally_classes(totals, FeatureBatch.of_geometries(geoms[:2], top1))
    assert totals["forest"] == {"count": 2}
