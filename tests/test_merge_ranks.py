"""The merge spread over ranks by raster: shares, feature files, rank 0's gather."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_gpkg_layer, run_mgpr_ranks

from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Detections
from mgpr.outputs.features import (
    feature_path,
    group_path,
    read_features,
    read_finalised,
    write_feature_group,
    write_features,
)
from mgpr.outputs.parts import PartWriter
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome
from mgpr.tasks.merge import assign_rasters, finalise_share, merge_run


def _run_with_three_rasters(make_image, run: Path):
    infos, tiles = [], []
    for name, size, crs in (
        ("a.tif", 384, "EPSG:32633"),
        ("b.tif", 256, "EPSG:32632"),
        ("c.tif", 256, "EPSG:32633"),
    ):
        info = describe_raster(str(make_image(name, width=size, height=size, crs=crs).path))
        infos.append(info)
        tiles += plan_tiles(info.path, size, size, 128, 32)
    ctx = TaskContext({i.path: i for i in infos}, 128, 32, ("bg", "thing"))
    task = get_task("detection")
    rng = np.random.default_rng(0)
    outcomes = []
    for t in tiles:
        xy = rng.uniform(0, 100, (3, 2))
        boxes = np.concatenate([xy, xy + 20], axis=1).astype(np.float32)
        rec = Detections(boxes, rng.uniform(0.3, 1, 3).astype(np.float32), np.ones(3, np.int64))
        outcomes.append(TileOutcome(t, 0, "", rec))
    PartWriter(run, 0, lambda outs, sink: task.write_payload(outs, ctx, sink)).publish(outcomes)
    return ctx, tiles, task


def test_shares_cover_every_raster_once_largest_first(make_image, tmp_path: Path) -> None:
    ctx, tiles, _ = _run_with_three_rasters(make_image, tmp_path / "run")
    a, b, c = list(ctx.rasters)
    assert assign_rasters(ctx, tiles, 1) == [[a, b, c]]
    assert assign_rasters(ctx, tiles, 2) == [[a], [b, c]]  # a has 16 tiles, b and c 9 each
    assert assign_rasters(ctx, tiles, 4) == [[a], [b], [c], []]


def test_gathered_feature_files_give_the_same_output_as_one_rank(
    make_image, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    ctx, tiles, task = _run_with_three_rasters(make_image, run)
    alone = merge_run(run, task, ctx, tiles, output_format="parquet")
    want = {p.name: p.read_bytes() for p in alone.output_paths}
    for path in alone.output_paths:
        path.unlink()
    paths1, features1 = finalise_share(run, task, ctx, tiles, 1, 2)
    paths0, features0 = finalise_share(run, task, ctx, tiles, 0, 2)
    assert paths1 == list(ctx.rasters)[1:] and paths0 == list(ctx.rasters)[:1]
    assert sorted(features1) == paths1 and sorted(features0) == paths0
    # rank 1's two rasters in one group file, rank 0's one in its raster's own file
    assert sorted(p.name for p in (run / "merge").iterdir()) == [
        group_path(run, 1).name,
        feature_path(run, 0).name,
    ]
    assert sorted(read_finalised(run)) == sorted(ctx.rasters)
    spread = merge_run(run, task, ctx, tiles, output_format="parquet", use_finalised=True)
    assert {p.name: p.read_bytes() for p in spread.output_paths} == want
    assert spread.duplicates_removed == alone.duplicates_removed > 0
    assert spread.layers == alone.layers and not (run / "merge").exists()


def test_rank0_finishes_a_raster_whose_rank_died(make_image, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ctx, tiles, task = _run_with_three_rasters(make_image, run)
    alone = merge_run(run, task, ctx, tiles)
    want = read_gpkg_layer(alone.output_path, "detections_epsg32633")
    finalise_share(run, task, ctx, tiles, 0, 2)  # rank 1 never published b and c
    spread = merge_run(run, task, ctx, tiles, use_finalised=True)
    assert read_gpkg_layer(spread.output_path, "detections_epsg32633") == want
    assert spread.records == alone.records


def test_feature_file_round_trip(tmp_path: Path) -> None:
    rings = np.arange(2 * 5 * 2, dtype=np.float64).reshape(2, 5, 2)
    batch = FeatureBatch(
        rings,
        {
            "score": np.array([0.5, 0.25]),
            "class_id": np.array([1, 2], np.int64),
            "label": np.array(["a", "b"], dtype=object),
        },
    )
    path = write_features(tmp_path / "merge" / "x.parquet", batch, {"path": "p", "n": 3})
    back, meta = read_features(path)
    assert meta == {"path": "p", "n": 3}
    np.testing.assert_array_equal(back.rings, rings)
    assert back.fields["label"].dtype == object and back.fields["label"].tolist() == ["a", "b"]
    assert back.fields["class_id"].dtype == np.int64
    assert not [p for p in (tmp_path / "merge").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_two_ranks_share_the_merge_and_write_what_one_rank_writes(
    tmp_path: Path,
) -> None:
    """Two rasters, two CPU ranks: rank 1 finalises one of them; the output is the same."""
    from mgpr.testimage import TestImageSpec, write_test_image

    folder = tmp_path / "in"
    for name in ("a.tif", "b.tif"):
        spec = TestImageSpec(width=384, height=256, objects=4, tile_size=128, overlap=32)
        write_test_image(folder / name, spec)
    outs = {}
    for gpus in (1, 2):
        run = tmp_path / f"run{gpus}"
        run_mgpr_ranks(
            gpus,
            f"input_path={folder}",
            "model=reference",
            "tile_size=128",
            "overlap=32",
            "workers=0",
            "output_format=parquet",
            f"output_dir={run}",
            "progress=false",
        )
        outs[gpus] = (run / "detections.parquet").read_bytes()
        assert not (run / "merge").exists()
    assert outs[1] == outs[2]
    log1 = (tmp_path / "run2" / "logs" / "rank1.log").read_text()
    assert "rank 1: its share of the merge took" in log1
    log0 = (tmp_path / "run2" / "logs" / "rank0.log").read_text()
    assert "merge shares of 2 ranks done" in log0


def test_a_group_file_gives_back_each_rasters_rows_and_counters(tmp_path: Path) -> None:
    def boxes(n: int, label: str) -> FeatureBatch:
        rings = np.arange(n * 10, dtype=np.float64).reshape(n, 5, 2) + len(label)
        return FeatureBatch(rings, {"label": np.array([label] * n, dtype=object)})

    entries = [("a.tif", boxes(2, "a"), {"duplicates_removed": 1}), ("b.tif", boxes(0, "b"), {})]
    entries.append(("c.tif", boxes(3, "cc"), {"duplicates_removed": 4}))
    write_feature_group(group_path(tmp_path, 0), entries)
    write_features(feature_path(tmp_path, 3), boxes(1, "d"), {"path": "d.tif"})
    back = read_finalised(tmp_path)
    assert sorted(back) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    for path, batch, meta in entries:
        got, counters = back[path]
        np.testing.assert_array_equal(got.rings, batch.rings)
        assert got.fields["label"].tolist() == batch.fields["label"].tolist()
        assert counters.get("duplicates_removed", 0) == meta.get("duplicates_removed", 0)
    assert read_finalised(tmp_path / "nothing") == {}
