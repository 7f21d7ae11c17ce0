"""The merge proves exactly-once: each planned tile once, from one part; missing tiles fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
from conftest import part_tile_rows, read_gpkg_layer, run_mgpr_inprocess
from rasterio.crs import CRS

from mgpr.errors import EXIT_TILES_MISSING
from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Detections
from mgpr.outputs.ledger import MISSING_FILE, build_ledger
from mgpr.outputs.parts import PartWriter
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome
from mgpr.tasks.layers import crs_suffix, plan_layers
from mgpr.tasks.merge import merge_run


def _det(x0: float, score: float) -> Detections:
    return Detections(
        np.array([[x0, 10, x0 + 20, 30]], np.float32),
        np.array([score], np.float32),
        np.array([1], np.int64),
    )


def _publish(run: Path, rank: int, ctx: TaskContext, outcomes: list[TileOutcome]) -> str:
    task = get_task("detection")
    writer = PartWriter(run, rank, lambda outs, sink: task.write_payload(outs, ctx, sink))
    writer.publish(outcomes)
    return f"{writer.prefix}-{writer.seq:06d}"


@pytest.fixture
def four_tiles(make_image):
    info = describe_raster(str(make_image(width=256, height=256).path))
    tiles = plan_tiles(info.path, 256, 256, 128, 0)
    return info, tiles, TaskContext({info.path: info}, 128, 0, ("bg", "thing"))


def test_a_tile_in_two_parts_is_written_once_from_one_part(four_tiles, tmp_path: Path) -> None:
    """Re-predicted after a requeue: both copies are published; the output holds one."""
    info, tiles, ctx = four_tiles
    run = tmp_path / "run"
    first = [TileOutcome(t, 0, "", _det(40, 0.9)) for t in tiles]
    a = _publish(run, 0, ctx, first)
    b = _publish(run, 1, ctx, [TileOutcome(tiles[0], 0, "", _det(60, 0.8))])  # same tile again
    assert len(part_tile_rows(run)) == 5
    ledger = build_ledger(run, [t.id.key() for t in tiles])
    assert ledger.duplicates == 1 and ledger.missing == []
    keep = min(a, b)  # done == done: the lexicographically first part name wins
    assert ledger.entries[tiles[0].id.key()].part == keep
    result = merge_run(run, get_task("detection"), ctx, tiles)
    assert result.records == 4 and result.duplicate_tiles == 1
    _, rows, _ = read_gpkg_layer(result.output_path, "detections")
    tile0 = [r for r in rows if r["tile_key"] == tiles[0].id.key()]
    assert len(tile0) == 1
    assert tile0[0]["px_xmin"] == (40 if keep == a else 60)


def test_best_status_wins_whatever_the_part_order(four_tiles, tmp_path: Path) -> None:
    info, tiles, ctx = four_tiles
    run = tmp_path / "run"
    key = tiles[0].id.key()
    _publish(run, 0, ctx, [TileOutcome(tiles[0], 0, "", _det(40, 0.9))])
    _publish(run, 1, ctx, [TileOutcome(tiles[0], 2, "IOError"), TileOutcome(tiles[1], 2, "x")])
    _publish(run, 2, ctx, [TileOutcome(tiles[1], 1)])
    ledger = build_ledger(run, [t.id.key() for t in tiles])
    assert ledger.entries[key].status == "done"
    assert ledger.entries[tiles[1].id.key()].status == "empty"
    assert ledger.count("failed") == 0 and ledger.duplicates == 2
    assert ledger.missing == [tiles[2].id.key(), tiles[3].id.key()]


def test_missing_tiles_are_listed_and_the_rest_is_accounted_once(
    four_tiles, tmp_path: Path
) -> None:
    info, tiles, ctx = four_tiles
    run = tmp_path / "run"
    _publish(run, 0, ctx, [TileOutcome(tiles[0], 0, "", _det(40, 0.9)), TileOutcome(tiles[1], 1)])
    result = merge_run(run, get_task("detection"), ctx, tiles)
    assert (result.tiles_planned, result.tiles_done, result.tiles_empty) == (4, 1, 1)
    assert result.tiles_missing == 2 and result.missing_path == run / MISSING_FILE
    assert (run / MISSING_FILE).read_text().splitlines() == [t.id.key() for t in tiles[2:]]
    # Once every tile is in a part the list goes away.
    _publish(run, 0, ctx, [TileOutcome(t, 1) for t in tiles[2:]])
    assert merge_run(run, get_task("detection"), ctx, tiles).tiles_missing == 0
    assert not (run / MISSING_FILE).exists()


def test_a_missing_tile_fails_the_run_with_exit_4_and_the_rerun_finishes_it(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A tile lost between predict and its part (here: dropped by the writer) is in no part."""
    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        "model=reference",
        "tile_size=128",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    ]
    real = PartWriter.publish
    lost = f"{img.path}::r1c1"

    def drop_one(self, outcomes):
        return real(self, [o for o in outcomes if o.tile.id.key() != lost])

    monkeypatch.setattr(PartWriter, "publish", drop_one)
    assert run_mgpr_inprocess(*args) == EXIT_TILES_MISSING
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mgpr: error: 1 of 4 planned tile(s) are in no published part")
    assert str(run / MISSING_FILE) in last and "re-run the same command" in last
    assert (run / MISSING_FILE).read_text() == f"{lost}\n"
    summary = (run / "summary.json").read_text()
    assert '"tiles_missing": 1' in summary
    monkeypatch.setattr(PartWriter, "publish", real)
    assert run_mgpr_inprocess(*args) == 0
    log = (run / "logs" / "rank0.log").read_text()
    assert "3 of the 4 planned tiles were finished by an earlier run; 1 left" in log
    assert not (run / MISSING_FILE).exists()
    keys = [k for k, _ in part_tile_rows(run)]
    assert len(keys) == len(set(keys)) == 4


# ----------------------------------------------------------------------------- layers and CRSs

LCC = (
    "+proj=lcc +lat_0=46 +lon_0={lon0} +lat_1=44 +lat_2=49 +x_0=700000 +y_0=6600000 "
    "+ellps=GRS80 +units=m +no_defs"
)


def test_layer_names_follow_the_crs_definition_not_its_text(make_image) -> None:
    a = describe_raster(str(make_image("a.tif", width=64, height=64, crs="EPSG:32633").path))
    b = describe_raster(str(make_image("b.tif", width=64, height=64, crs="EPSG:32632").path))
    c = describe_raster(str(make_image("c.tif", width=64, height=64, crs=LCC.format(lon0=3)).path))
    d = describe_raster(str(make_image("d.tif", width=64, height=64, crs=LCC.format(lon0=4)).path))
    e = describe_raster(str(make_image("e.tif", width=64, height=64, crs="none").path))
    same_as_a = describe_raster(
        str(make_image("a2.tif", width=64, height=64, crs=CRS.from_epsg(32633).to_wkt()).path)
    )
    assert [x.name for x in plan_layers([a, same_as_a], "detections")] == ["detections"]
    assert [x.name for x in plan_layers([e], "detections")] == ["detections"]
    layers = plan_layers([a, b, c, d, e, same_as_a], "detections")
    names = [x.name for x in layers]
    assert names[:2] == ["detections_epsg32633", "detections_epsg32632"]
    assert names[2].startswith("detections_crs") and names[3].startswith("detections_crs")
    assert names[2] != names[3] and names[4] == "detections_pixel"
    assert layers[0].paths == (a.path, same_as_a.path)
    # Stable whatever the other inputs: a raster's suffix depends on its own CRS only.
    assert [x.name for x in plan_layers([d, a], "detections")] == [names[3], names[0]]
    assert crs_suffix(c.crs_wkt) == names[2].removeprefix("detections_")


def test_two_lcc_rasters_differing_only_in_lon_0_get_two_layers_in_place(
    tmp_path: Path, capsys
) -> None:
    from mgpr.testimage import TestImageSpec, read_truth, write_test_image

    folder = tmp_path / "in"
    images = {}
    for lon0 in (3, 4):
        spec = TestImageSpec(
            width=256, height=256, crs=LCC.format(lon0=lon0), objects=3, object_max_px=24
        )
        images[lon0] = write_test_image(folder / f"lcc{lon0}.tif", spec)
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={folder}",
        "model=reference",
        "tile_size=128",
        "overlap=32",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    gpkg = run / "predictions.gpkg"
    layers = sorted(name for name, _ in pyogrio.list_layers(gpkg))
    assert len(layers) == 2 and all(n.startswith("detections_crs") for n in layers)
    for img in images.values():
        info = describe_raster(str(img.path))
        name = f"detections_{crs_suffix(info.crs_wkt)}"
        assert name in layers
        assert CRS.from_user_input(pyogrio.read_info(gpkg, layer=name)["crs"]) == CRS.from_wkt(
            info.crs_wkt
        )
        geoms, rows, _ = read_gpkg_layer(gpkg, name)
        assert {Path(r["source"]).name for r in rows} == {img.path.name}
        truth = read_truth(img.truth_path)
        assert len(geoms) == len(truth) == 3
        t = info.transform
        want = sorted(
            (
                t.c + o.col_min * t.a,
                t.f + o.row_max * t.e,
                t.c + o.col_max * t.a,
                t.f + o.row_min * t.e,
            )
            for o in truth
        )
        np.testing.assert_allclose(sorted(g.bounds for g in geoms), want, atol=1e-6)
