"""The ``mgpr`` command end to end on real GeoTIFFs (CPU; several ranks use gloo)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import rasterio.windows
from conftest import (
    mgpr_cmd,
    part_tile_rows,
    read_gpkg_layer,
    run_mgpr_inprocess,
    run_mgpr_ranks,
    subprocess_env,
)

from mgpr.geo.tiling import plan_tiles, valid_window
from mgpr.outputs.parts_read import read_manifests


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_quickstart_finds_every_planted_object_once(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(f"output_dir={run}", "image_size=1024", "objects=16", "workers=0")
    out = capsys.readouterr().out
    assert rc == 0, out
    check = _summary(run)["demo_check"]
    assert check["planted"] == 16 and check["found"] == 16
    assert check["duplicates"] == 0 and check["unmatched_detections"] == 0
    assert check["on_seam"] > 0 and check["max_footprint_error_px"] <= 1.0
    assert "demo check   OK" in out
    geoms, rows, epsg = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert len(geoms) == 16 and epsg == 32633
    (label,) = {r["label"] for r in rows}
    assert _summary(run)["classes"] == {label: {"count": 16}}
    assert f"  classes      {label} 16\n" in out
    assert {"score", "class_id", "label", "source", "tile_row", "tile_col"} <= set(rows[0])


def test_the_demo_with_a_classifier_runs_and_skips_the_object_check(tmp_path: Path, capsys) -> None:
    """``uv run mgpr model=resnet50``: the planted objects check boxes or pixels; a tile classifier
    has nothing to check, so the run ends with its classifications instead of a failed read of a
    ``detections`` layer it never wrote (it was reported as a file-system error, exit 2)."""
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"output_dir={run}", "model=null", "image_size=512", "tile_size=128", "workers=0"
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = _summary(run)
    assert "demo_check" not in summary
    assert summary["records"] == summary["tiles_total"] > 1
    assert "demo check skipped" in out.err + out.out and "model=null" in out.err + out.out


def test_demo_image_is_written_by_rank_0_only_and_awaited_by_the_others(tmp_path: Path) -> None:
    """Under srun every rank starts together: a rank that wrote its own copy of the demo image
    would give it another mtime, so another run fingerprint than rank 0's run.json."""
    import threading

    from mgpr.conf.load import load_config
    from mgpr.errors import RankJoinError
    from mgpr.run.demo import demo_image

    cfg = load_config(["image_size=256", "objects=4", "join_timeout_s=60"])
    run = tmp_path / "run"
    seen: dict[int, tuple[Path, Path | None, float]] = {}

    def rank(r: int) -> None:
        image, truth = demo_image(run, cfg, r, 128, 32)
        seen[r] = (image, truth, image.stat().st_mtime)

    later = threading.Thread(target=rank, args=(1,))
    later.start()  # rank 1 first: it must wait, not write
    later.join(0.5)
    assert later.is_alive() and not (run / "demo").exists()
    rank(0)
    later.join(30)
    assert not later.is_alive()
    assert seen[1] == seen[0] and seen[0][1] is not None and seen[0][1].exists()

    cfg.join_timeout_s = 1
    with pytest.raises(RankJoinError, match="for rank 0 to write the demo image"):
        demo_image(tmp_path / "other", cfg, 1, 128, 32)


def test_resnet50_random_weights_classifies_every_tile(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=300, height=200)
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}",
        "model=resnet50",
        "weights=none",
        "tile_size=128",
        "batch_size=4",
        "workers=0",
        "topk=3",
        f"output_dir={run}",
        "progress=false",
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in out
    summary = _summary(run)
    assert summary["random_weights"] is True and summary["tiles_predicted"] == 6
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    tiles = {t.id.key(): t for t in plan_tiles(str(img.path), 200, 300, 128, 0)}
    with rasterio.open(img.path) as src:
        transform = src.transform
    for geom, row in zip(geoms, rows, strict=True):
        window = valid_window(tiles[row["tile_key"]])
        left, bottom, right, top = rasterio.windows.bounds(window, transform)
        np.testing.assert_allclose(geom.bounds, (left, bottom, right, top), atol=1e-6)
        assert 0 <= row["score_1"] <= 1 and row["class_id_1"] >= 0
    assert (run / "report.json").exists() and (run / "run.json").exists()


def test_fake_data_environment_test(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        "use_fake_data=true",
        "dummy_dataset_count=10",
        "model=null",
        "tile_size=64",
        "batch_size=4",
        "workers=0",
        f"output_dir={run}",
    )
    assert rc == 0
    summary = _summary(run)
    assert summary["tiles_predicted"] == 10 and summary["output"] is None


def test_nodata_tiles_are_skipped_and_counted(make_image, tmp_path: Path) -> None:
    img = make_image(width=1024, height=1024, nodata="rect", nodata_mode="mask")
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}", "model=null", "tile_size=128", "workers=0", f"output_dir={run}"
    )
    assert rc == 0
    s = _summary(run)
    assert s["tiles_skipped_nodata"] > 0
    assert s["tiles_predicted"] + s["tiles_skipped_nodata"] == s["tiles_total"] == 64
    assert s["records"] == s["tiles_predicted"]


def test_existing_output_of_another_run_is_not_overwritten(
    make_image, tmp_path: Path, capsys
) -> None:
    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    base = [f"input_path={img.path}", "tile_size=128", "workers=0", f"output_dir={run}"]
    assert run_mgpr_inprocess(*base, "model=null") == 0
    before = (run / "predictions.gpkg").read_bytes()
    capsys.readouterr()
    rc = run_mgpr_inprocess(*base, "model=reference")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("mgpr: error:") and "overwrite=true" in err[-1]
    assert (run / "predictions.gpkg").read_bytes() == before
    assert run_mgpr_inprocess(*base, "model=reference", "overwrite=true") == 0
    assert _summary(run)["model"] == "reference"


def test_resume_predicts_only_unfinished_tiles(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=512, height=512, objects=6, tile_size=128, overlap=32)
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        "model=reference",
        "tile_size=128",
        "overlap=32",
        "workers=0",
        f"output_dir={run}",
    ]
    assert run_mgpr_inprocess(*args) == 0
    first = _summary(run)
    assert (first["tiles_this_run"], first["tiles_earlier_runs"]) == (first["tiles_total"], 0)
    full = read_gpkg_layer(run / "predictions.gpkg", "detections")
    # Simulate a run killed half way: its manifests name half the tiles (their records stay in
    # the payload: a manifest, not a payload, says a tile is done), and no final file.
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mgpr.outputs.parts_read import list_parts

    keys = sorted(k for k, _ in part_tile_rows(run))
    lost = keys[: len(keys) // 2]
    for part in list_parts(run):
        table = pq.read_table(part.manifest)
        keep = pc.invert(pc.is_in(table["tile_key"], value_set=pa.array(lost)))
        pq.write_table(table.filter(keep), part.manifest)
    (run / "predictions.gpkg").unlink()
    assert run_mgpr_inprocess(*args) == 0
    log = (run / "logs" / "rank0.log").read_text()
    assert f"{len(keys) - len(lost)} of the {len(keys)} planned tiles were finished" in log
    summary = _summary(run)  # the whole job's counts, and what this run did of them
    assert summary["tiles_predicted"] + summary["tiles_skipped_nodata"] == len(keys)
    assert summary["tiles_this_run"] == len(lost)
    assert summary["tiles_earlier_runs"] == len(keys) - len(lost)
    again = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert sorted(g.wkt for g in again[0]) == sorted(g.wkt for g in full[0])
    rows = [k for k, _ in part_tile_rows(run)]
    assert len(rows) == len(set(rows)) == len(keys)
    capsys.readouterr()
    assert run_mgpr_inprocess(*args) == 0  # nothing left: it only merges
    out = capsys.readouterr().out
    assert f"0 in this run, {len(keys)} by earlier runs" in out
    assert "throughput   none: earlier runs finished every tile, this one merged" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["input_path=/nonexistent/ortho.tif"],
            "input_path='/nonexistent/ortho.tif' does not exist",
        ),
        (["bach_size=4"], "batch_size"),
        (["model=resnet5"], "resnet50"),
        (["tile_size=64", "overlap=64"], "overlap"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys
) -> None:
    rc = run_mgpr_inprocess(*args, f"output_dir={tmp_path / 'run'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("mgpr: error:") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def _env() -> dict[str, str]:
    return subprocess_env()


@pytest.mark.slow
def test_two_ranks_give_the_same_output_as_one(make_image, tmp_path: Path) -> None:
    # 7 columns x 1 row of 128 px tiles, claimed in chunks by the ranks.
    img = make_image(
        width=7 * 96 + 32,
        height=128,
        objects=5,
        tile_size=128,
        overlap=32,
        object_max_px=24,
        seam_share=0.6,
    )
    outs = {}
    for gpus in (1, 2):
        run = tmp_path / f"run{gpus}"
        run_mgpr_ranks(
            gpus,
            f"input_path={img.path}",
            "model=reference",
            "tile_size=128",
            "overlap=32",
            "workers=0",
            f"output_dir={run}",
            "progress=false",
        )
        s = _summary(run)
        assert s["world_size"] == gpus and s["tiles_predicted"] == 7
        geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
        outs[gpus] = sorted(
            (g.wkt, r["score"], r["tile_key"]) for g, r in zip(geoms, rows, strict=True)
        )
        table = read_manifests(run)
        ranks = {name.split("-")[0] for name in table["part"].to_pylist()}
        keys = table["tile_key"].to_pylist()
        # Ranks claim chunks as they go: any split, but every tile exactly once, and every rank
        # took part (its report part; a rank that claimed no tile publishes no part file).
        assert len(keys) == 7 and ranks <= {f"r{r}" for r in range(gpus)}
        assert len(set(keys)) == 7
        report = json.loads((run / "report.json").read_text())
        assert sorted(r["global_rank"] for r in report["ranks"]) == list(range(gpus))
    assert outs[1] == outs[2] and len(outs[1]) == 5


@pytest.mark.slow
def test_fewer_tiles_than_ranks(make_image, tmp_path: Path) -> None:
    img = make_image(width=100, height=80)
    run = tmp_path / "run"
    cmd = mgpr_cmd(
        f"input_path={img.path}",
        "model=null",
        "tile_size=128",
        "workers=0",
        "gpus=2",
        "accelerator=cpu",
        f"output_dir={run}",
        "progress=false",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = _summary(run)
    assert s["world_size"] == 2 and s["tiles_predicted"] == 1 and s["records"] == 1


def test_empty_result_has_the_same_schema_as_a_full_one(make_image, tmp_path: Path) -> None:
    """Nothing found is an empty layer with every field, not a missing file (unlike DeepForest)."""
    img = make_image(width=512, height=512)  # no planted objects
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}",
        "model=reference",
        "tile_size=256",
        "overlap=32",
        "workers=0",
        f"output_dir={run}",
    )
    assert rc == 0
    conn = sqlite3.connect(run / "predictions.gpkg")
    cols = {r[1] for r in conn.execute('PRAGMA table_info("detections")')}
    count = conn.execute('SELECT COUNT(*) FROM "detections"').fetchone()[0]
    conn.close()
    assert count == 0
    assert {"score", "class_id", "label", "source", "tile_row", "tile_col", "px_xmin"} <= cols


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_mgpr_and_its_stack_without_running(
    flag: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    from importlib import metadata

    monkeypatch.chdir(tmp_path)
    assert run_mgpr_inprocess(flag, "input_path=/nonexistent.tif") == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"mgpr {metadata.version('mgpr')} (Python ")
    for name in ("torch", "lightning", "with GDAL"):
        assert name in out
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


def test_a_run_prints_none_of_lightnings_notices_about_mgprs_own_choices(
    make_image, tmp_path: Path, recwarn
) -> None:
    """The claim sampler and the module's transfer_batch_to_device are deliberate: Lightning's
    notices about them ("Make sure your sampler is configured correctly") read as faults."""
    img = make_image(width=256, height=256, objects=2)
    args = [f"input_path={img.path}", "model=reference", "tile_size=128", "workers=0"]
    assert run_mgpr_inprocess(*args, f"output_dir={tmp_path / 'run'}") == 0
    said = [str(w.message) for w in recwarn]
    assert not [m for m in said if "custom batch sampler" in m or "transfer_batch_to_device" in m]


def test_tiles_that_hit_the_box_cap_are_counted_and_warned(tmp_path: Path, capsys) -> None:
    """A dense tile keeps at most max_detections boxes, best first: the rest were dropped without
    a word. The summary now counts the tiles holding exactly the cap and says what to do."""
    run = tmp_path / "run"
    args = (f"output_dir={run}", "image_size=1024", "objects=16", "workers=0", "tile_size=256")
    assert run_mgpr_inprocess(*args, "max_detections=2") == 0
    out = capsys.readouterr().out
    summary = _summary(run)
    counts = read_manifests(run).to_pydict()
    expected = sum(
        1
        for n, s in zip(counts["n_records"], counts["status"], strict=True)
        if s == "done" and n >= 2
    )
    assert summary["max_detections"] == 2 and summary["tiles_at_box_cap"] == expected > 0
    assert (
        f"WARNING: {expected} of {summary['tiles_predicted']} predicted tiles hold 2 boxes" in out
    )
    assert "re-run with max_detections=6 and overwrite=true" in out
    other = tmp_path / "uncapped"
    assert run_mgpr_inprocess(*args[1:], f"output_dir={other}") == 0  # the default 100
    assert _summary(other)["tiles_at_box_cap"] == 0 and "max_detections cap" not in (
        capsys.readouterr().out
    )
