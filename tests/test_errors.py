"""Bad input and faults through the real ``mgpr`` CLI: one clear line, an exit code, nothing lost.

Every case asserts the exit code, that stderr's last line is one ``mgpr: ...`` line naming the
value (no traceback anywhere), and that files written before the error are untouched. Runs are
in-process (Lightning is imported once per pytest process) except the SIGTERM test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    mgpr_cmd,
    part_tile_rows,
    read_gpkg_layer,
    run_mgpr_inprocess,
    subprocess_env,
    write_paletted,
)

from mgpr.errors import EXIT_INTERRUPTED, EXIT_TILES_FAILED, EXIT_USAGE
from mgpr.outputs.parts_read import finished_tile_keys
from mgpr.testimage import TestImageSpec, corrupt_block, write_test_image


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = run_mgpr_inprocess(*args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _last_line(err: str, rc: int, code: int, *needles: str) -> str:
    """The one line the user reads; asserts exit code, no traceback, every needle in it."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("mgpr: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (run logs excluded: they are appended to)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "logs" not in p.relative_to(root).parts
    }


def _assert_untouched(before: dict[str, bytes], root: Path) -> None:
    after = _snapshot(root)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed or vanished"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _part_tiles(run: Path) -> tuple[int, int, int]:
    """(rows, distinct tiles, tiles done) in the run's published part manifests."""
    rows = part_tile_rows(run)
    return len(rows), len({k for k, _ in rows}), sum(s == "done" for _, s in rows)


# ----------------------------------------------------------------- checked before any work, exit 2

Case = Callable[[Path], tuple[list[str], list[str]]]


def _rgb(tmp: Path) -> Path:
    return write_test_image(tmp / "in" / "rgb.tif", TestImageSpec(width=128, height=128)).path


def _missing_path(tmp: Path) -> tuple[list[str], list[str]]:
    return [f"input_path={tmp}/nope.tif"], [f"input_path='{tmp}/nope.tif' does not exist"]


def _missing_path_with_hydra_syntax(tmp: Path) -> tuple[list[str], list[str]]:
    # ( ) , = and spaces are Hydra grammar; in a path key they are just characters.
    return [f"input_path={tmp}/ortho (1),v=2.tif"], [f"'{tmp}/ortho (1),v=2.tif' does not exist"]


def _not_a_raster(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "notes.tif").write_text("not a raster")
    return [f"input_path={tmp}/notes.tif"], [f"'{tmp}/notes.tif' is not a readable raster"]


def _empty_folder(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "empty").mkdir()
    return [f"input_path={tmp}/empty"], [f"input_path='{tmp}/empty' is a folder without rasters"]


def _glob_matches_nothing(tmp: Path) -> tuple[list[str], list[str]]:
    return [f"input_path={tmp}/*.tiff"], [f"input_path='{tmp}/*.tiff': the glob matches no file"]


def _list_names_missing_file(tmp: Path) -> tuple[list[str], list[str]]:
    listing = tmp / "inputs.txt"
    listing.write_text(f"# tiles\n{_rgb(tmp)}\nmissing.tif\n")
    return (
        [f"input_path={listing}"],
        [f"{listing}:3 names 'missing.tif'", "fix or remove that line"],
    )


def _wrong_band_count(tmp: Path) -> tuple[list[str], list[str]]:
    gray = write_test_image(tmp / "gray.tif", TestImageSpec(width=128, height=128, bands=1)).path
    return (
        [f"input_path={gray}", "model=resnet50", "weights=none"],
        ["has 1 band(s), but the model needs 3", "bands=[1,1,1]"],
    )


def _band_the_raster_lacks(tmp: Path) -> tuple[list[str], list[str]]:
    return (
        [f"input_path={_rgb(tmp)}", "model=null", "bands=[1,4]"],
        ["bands=[1, 4] names band 4", "has 3 band(s)", "use indexes 1..3"],
    )


def _paletted_raster(tmp: Path) -> tuple[list[str], list[str]]:
    path = write_paletted(tmp / "paletted.tif", 64)
    return (
        [f"input_path={path}", "model=null"],
        ["is a paletted image", "gdal_translate -expand rgb"],
    )


def _tile_not_above_overlap(tmp: Path) -> tuple[list[str], list[str]]:
    return ["tile_size=64", "overlap=64"], ["overlap=64", "tile_size=64"]


def _tile_below_one(tmp: Path) -> tuple[list[str], list[str]]:
    return ["tile_size=0"], ["tile_size=0"]


def _negative_overlap(tmp: Path) -> tuple[list[str], list[str]]:
    return ["overlap=-1"], ["overlap=-1"]


def _batch_below_one(tmp: Path) -> tuple[list[str], list[str]]:
    return ["batch_size=0"], ["batch_size=0 is out of range", "batch_size=8"]


def _negative_workers(tmp: Path) -> tuple[list[str], list[str]]:
    return ["workers=-1"], ["workers=-1 is out of range", "workers=0"]


def _unknown_model(tmp: Path) -> tuple[list[str], list[str]]:
    return (
        [f"input_path={_rgb(tmp)}", "model=resnet5"],
        [
            "model=resnet5 is not a known model",
            "resnet50, resnet50-embed, fasterrcnn, maskrcnn, reference, deeplabv3, fcn, "
            "lraspp, reference-seg, null",
        ],
    )


def _import_path_missing_module(tmp: Path) -> tuple[list[str], list[str]]:
    return (
        [f"input_path={_rgb(tmp)}", "model=mgpr_no_such_pkg.models:build"],
        ["module 'mgpr_no_such_pkg.models' does not import", "No module named 'mgpr_no_such_pkg'"],
    )


def _import_path_module_raises(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "mgpr_broken_model.py").write_text("import torch\nNET = undefined_name\n")
    return (
        [f"input_path={_rgb(tmp)}", "model=mgpr_broken_model:build"],
        [
            "module 'mgpr_broken_model' was found but raised while importing",
            "NameError",
            "mgpr_broken_model.py:2",
        ],
    )


def _checkpoint_does_not_fit(tmp: Path) -> tuple[list[str], list[str]]:
    import torch
    import torchvision

    ckpt = tmp / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    return (
        [f"input_path={_rgb(tmp)}", "model=resnet50", f"weights={ckpt}"],
        [f"weights={ckpt} does not fit model=resnet50", "missing", "shape mismatch"],
    )


def _not_writable_under_file(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "a_file").write_text("x")
    return (
        [f"input_path={_rgb(tmp)}", "model=null", f"output_dir={tmp}/a_file/sub"],
        [
            f"output_dir='{tmp}/a_file/sub' cannot be made: '{tmp}/a_file' is a file, not a folder",
            "choose another output_dir",
        ],
    )


def _output_dir_is_a_file(tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "a_file").write_text("x")
    return (
        [f"input_path={_rgb(tmp)}", "model=null", f"output_dir={tmp}/a_file"],
        [f"output_dir='{tmp}/a_file' is a file, not a folder; choose another output_dir"],
    )


def _not_writable_proc(tmp: Path) -> tuple[list[str], list[str]]:
    return (
        [f"input_path={_rgb(tmp)}", "model=null", "output_dir=/proc/mgpr-run"],
        ["output_dir='/proc/mgpr-run' is not writable"],
    )


def _input_among_the_runs_own_results(tmp: Path) -> tuple[list[str], list[str]]:
    seg = tmp / "run" / "segmentation"
    seg.mkdir(parents=True)
    cmap = write_test_image(seg / "ortho.tif", TestImageSpec(width=64, height=64)).path
    return (
        [f"input_path={cmap}", "model=reference-seg"],
        [f"input '{cmap}' lies in '{seg}', a folder this run writes", "another output_dir"],
    )


def _misspelt_key(tmp: Path) -> tuple[list[str], list[str]]:
    return ["tile_sise=256"], ["unknown config key `tile_sise`", "did you mean `tile_size`?"]


@pytest.mark.parametrize(
    "case",
    [
        _missing_path,
        _missing_path_with_hydra_syntax,
        _not_a_raster,
        _empty_folder,
        _glob_matches_nothing,
        _list_names_missing_file,
        _wrong_band_count,
        _band_the_raster_lacks,
        _paletted_raster,
        _tile_not_above_overlap,
        _tile_below_one,
        _negative_overlap,
        _batch_below_one,
        _negative_workers,
        _unknown_model,
        _import_path_missing_module,
        _import_path_module_raises,
        _checkpoint_does_not_fit,
        _not_writable_under_file,
        _output_dir_is_a_file,
        _not_writable_proc,
        _input_among_the_runs_own_results,
        _misspelt_key,
    ],
    ids=lambda c: c.__name__.strip("_"),
)
def test_checked_before_any_work(case: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # for the custom model cases
    args, needles = case(tmp_path)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "notes.txt").write_text("a user's file in the output folder")
    before = _snapshot(tmp_path)
    for key, value in (("output_dir", str(run)), ("workers", "0"), ("progress", "false")):
        if not any(a.startswith(f"{key}=") for a in args):
            args.append(f"{key}={value}")
    rc, _, err = _run(capsys, *args)
    _last_line(err, rc, EXIT_USAGE, "mgpr: error: ", *needles)
    _assert_untouched(before, tmp_path)
    assert not (run / "run.json").exists() and not (run / "parts").exists()


def test_num_nodes_outside_slurm_without_a_master_is_refused_at_once(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """It waited join_timeout_s (300 s) for nodes nobody started; now one line at once."""
    from mgpr.run.devices import NODE_LAUNCHER_VARS, check_manual_nodes

    for var in ("MASTER_ADDR", "SLURM_JOB_ID", "SLURM_NTASKS", *NODE_LAUNCHER_VARS):
        monkeypatch.delenv(var, raising=False)
    rc, _, err = _run(
        capsys,
        f"input_path={_rgb(tmp_path)}",
        "model=null",
        "num_nodes=2",
        "workers=0",
        f"output_dir={tmp_path / 'run'}",
    )
    _last_line(err, rc, EXIT_USAGE, "num_nodes=2 outside SLURM", "MASTER_ADDR", "--nodes=2")
    check_manual_nodes(2, {"MASTER_ADDR": "n1", "MASTER_PORT": "29500", "NODE_RANK": "1"})
    check_manual_nodes(2, {"TORCHELASTIC_RUN_ID": "x"})  # torchrun knows its nodes
    check_manual_nodes(1, {})


def test_weights_not_cached_offline_fail_fast(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    # TORCH_HOME is an empty temp dir (conftest). A proxy on a closed local port makes the
    # download fail at once whatever this machine's network, like an offline compute node.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    img = make_image(width=128, height=128)
    rc, _, err = _run(
        capsys,
        f"input_path={img.path}",
        "model=resnet50",
        "weights=DEFAULT",
        f"output_dir={tmp_path / 'run'}",
        "workers=0",
    )
    _last_line(
        err,
        rc,
        EXIT_USAGE,
        "weights=DEFAULT for resnet50 are not in the cache",
        "`mgpr-fetch-weights resnet50`",
        "TORCH_HOME=",
    )
    assert not (tmp_path / "run" / "run.json").exists()


def test_output_of_another_run_is_kept(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=128, height=128)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"fingerprint": {"model": "fasterrcnn"}}))
    (run / "predictions.gpkg").write_bytes(b"results of another run")
    before = _snapshot(tmp_path)
    rc, _, err = _run(
        capsys, f"input_path={img.path}", "model=null", f"output_dir={run}", "workers=0"
    )
    _last_line(
        err,
        rc,
        EXIT_USAGE,
        f"output_dir='{run}' holds results of another run",
        "model differs: was fasterrcnn, now null",
        "overwrite=true",
    )
    _assert_untouched(before, tmp_path)


def test_malicious_checkpoint_is_refused_and_never_runs(make_image, tmp_path: Path, capsys) -> None:
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling would call os.system("touch <marker>")
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "payload": Evil()}, ckpt)
    img = make_image(width=128, height=128)
    rc, _, err = _run(
        capsys,
        f"input_path={img.path}",
        "model=resnet50",
        f"weights={ckpt}",
        f"output_dir={tmp_path / 'run'}",
        "workers=0",
    )
    _last_line(
        err, rc, EXIT_USAGE, f"weights={ckpt} cannot be read with torch.load(weights_only=True)"
    )
    assert not marker.exists()
    assert "\x1b" not in err  # torch's message sets bold text: no escape reaches the line


# ------------------------------------------------------------------------------ allowed inputs


def test_raster_without_crs_runs_in_pixel_coordinates(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=256, height=256, crs="none")
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = _run(
            capsys,
            f"input_path={img.path}",
            "model=null",
            "tile_size=128",
            "workers=0",
            f"output_dir={run}",
            "progress=false",
        )
    assert rc == 0 and "Traceback" not in err
    assert err.count("has no CRS") == 1 and "pixel coordinates" in err
    noisy = [
        w
        for w in caught
        if "NotGeoreferenced" in w.category.__name__ or "'crs' was not provided" in str(w.message)
    ]
    assert not noisy, [str(w.message) for w in noisy]
    assert _summary(run)["pixel_coordinates"] == [str(img.path)]
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    assert max(g.bounds[2] for g in geoms) == 256  # x = column


def test_a_geotransform_without_crs_is_said_to_be_in_its_coordinates(
    make_image, tmp_path: Path, capsys
) -> None:
    """A world file without its .prj: the results are in the transform's map coordinates (a
    layer without CRS), which the warning and the summary say, not "pixel coordinates"."""
    import rasterio

    img = make_image(width=256, height=256)
    bare = tmp_path / "world.tif"
    with rasterio.open(img.path) as src:
        profile = {**src.profile, "crs": None}
        with rasterio.open(bare, "w", **profile) as dst:
            dst.write(src.read())
            transform = src.transform
    run = tmp_path / "run"
    args = (f"input_path={bare}", "model=null", "tile_size=128", "workers=0", f"output_dir={run}")
    rc, out, err = _run(capsys, *args, "progress=false")
    assert rc == 0 and "Traceback" not in err
    assert "has a geotransform but no CRS: its results are in that transform's map" in err
    assert "gdal_edit.py -a_srs EPSG:XXXX" in err and "pixel coordinates" not in err
    summary = _summary(run)
    assert summary["no_crs"] == [str(bare)] and summary["pixel_coordinates"] == []
    assert "1 input(s) in their geotransform's coordinates, CRS unnamed" in out
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    assert max(g.bounds[2] for g in geoms) == transform.c + 256 * transform.a  # map x


def test_raster_smaller_than_one_tile_is_one_padded_tile(
    make_image, tmp_path: Path, capsys
) -> None:
    img = make_image(width=50, height=40)
    run = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        f"input_path={img.path}",
        "model=null",
        "tile_size=128",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    assert rc == 0 and "Traceback" not in err
    s = _summary(run)
    assert s["tiles_total"] == s["tiles_predicted"] == 1
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    # The footprint is the raster's (50 x 40 px at 0.1 m), not the padded 128 px tile.
    assert len(geoms) == 1
    x0, y0, x1, y1 = geoms[0].bounds
    assert (round(x1 - x0, 6), round(y1 - y0, 6)) == (5.0, 4.0)


def test_rasters_in_different_crss_get_one_layer_each(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    for name, crs in (("east.tif", "EPSG:32633"), ("west.tif", "EPSG:32632")):
        write_test_image(folder / name, TestImageSpec(width=256, height=256, crs=crs))
    run = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        f"input_path={folder}",
        "model=null",
        "tile_size=128",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    assert rc == 0 and "Traceback" not in err
    assert _summary(run)["layers"] == {
        "classifications_epsg32633": 4,
        "classifications_epsg32632": 4,
    }
    for layer, epsg, source in (
        ("classifications_epsg32633", 32633, "east.tif"),
        ("classifications_epsg32632", 32632, "west.tif"),
    ):
        geoms, rows, srs = read_gpkg_layer(run / "predictions.gpkg", layer)
        assert srs == epsg and len(geoms) == 4
        assert {Path(r["source"]).name for r in rows} == {source}


# ------------------------------------------------------------------------- faults during the run


def test_corrupt_block_fails_one_tile_and_the_run_goes_on(tmp_path: Path, capsys) -> None:
    img = write_test_image(
        tmp_path / "ortho.tif", TestImageSpec(width=512, height=512, block_size=128)
    ).path
    corrupt_block(img, block_row=1, block_col=2)
    run = tmp_path / "run"
    rc, out, err = _run(
        capsys,
        f"input_path={img}",
        "model=null",
        "tile_size=128",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    _last_line(
        err,
        rc,
        EXIT_TILES_FAILED,
        "1 of 16 tile(s) failed",
        str(run / "failed_tiles.csv"),
        f"exit code {EXIT_TILES_FAILED}",
    )
    assert sum("ERROR" in line for line in err.splitlines()) <= 3  # GDAL does not spam
    s = _summary(run)
    assert s["tiles_failed"] == 1 and s["tiles_predicted"] == 15
    key = f"{img}::r1c2"
    assert s["failed_tiles"][0]["tile"] == key
    assert "IReadBlock failed at X offset 2, Y offset 1" in s["failed_tiles"][0]["reason"]
    assert key in (run / "failed_tiles.csv").read_text()
    assert "failed_tiles.csv" in out
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    assert len(geoms) == 15


def test_many_failed_tiles_are_logged_ten_then_counted(tmp_path: Path, capsys) -> None:
    """A damaged raster (here 24 of 64 blocks) logs 10 failures and one line, not one per tile."""
    img = write_test_image(
        tmp_path / "ortho.tif", TestImageSpec(width=512, height=512, block_size=64)
    ).path
    for row in range(3):
        for col in range(8):
            corrupt_block(img, block_row=row, block_col=col)
    run = tmp_path / "run"
    rc, _out, err = _run(
        capsys,
        f"input_path={img}",
        "model=null",
        "tile_size=64",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    assert rc == EXIT_TILES_FAILED and "24 of 64 tile(s) failed" in err
    assert sum("failed to read:" in line for line in err.splitlines()) == 10
    assert sum("further failures are not logged" in line for line in err.splitlines()) == 1
    assert len(_summary(run)["failed_tiles"]) == 24
    assert len((run / "failed_tiles.csv").read_text().splitlines()) == 25  # header + 24
    # The preview is still drawn, the damaged blocks as nodata: it shows where the damage is.
    assert (run / "preview.png").exists() and "24 of 64 blocks unreadable" in err
    log = (run / "logs" / "rank0.log").read_text()  # ends with the run's last line too
    assert "24 of 64 tile(s) failed" in log.strip().splitlines()[-1]


def _write_module(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    return f"{name}:build"


def test_out_of_memory_names_batch_size_and_keeps_parts(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    model = _write_module(
        tmp_path,
        "mgpr_oom_model",
        """
        import torch

        class OomOnSecondBatch(torch.nn.Module):
            task = "classification"
            in_bands = 3

            def __init__(self):
                super().__init__()
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls == 2:
                    raise torch.OutOfMemoryError(
                        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                        "capacity of 79.1 GiB of which 1.2 GiB is free.")
                return torch.zeros(x.shape[0], 2)

        def build(weights):
            return OomOnSecondBatch()
    """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        f"input_path={img.path}",
        f"model={model}",
        "tile_size=64",
        "batch_size=4",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    )
    _last_line(
        err,
        rc,
        EXIT_USAGE,
        "out of memory",
        "batch_size=4",
        "batch_size=2",
        "CUDA out of memory",
        str(run / "parts"),
    )
    assert _part_tiles(run) == (4, 4, 4)  # the first batch is kept for the resume


def test_writer_failure_stops_and_keeps_the_good_output(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    import shutil

    from mgpr.outputs.parts import PartWriter

    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        "model=null",
        "tile_size=128",
        "batch_size=1",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    ]
    assert _run(capsys, *args)[0] == 0
    shutil.rmtree(run / "parts")  # the same run again, from scratch (a resume with no tiles)
    before = _snapshot(tmp_path)
    real_publish = PartWriter.publish

    def disk_full(self, outcomes):
        # The disk fills up mid-run: the first tile's chunk is published, the next one fails.
        real_publish(self, outcomes[:1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PartWriter, "publish", disk_full)
    rc, _, err = _run(capsys, *args)
    _last_line(
        err,
        rc,
        EXIT_USAGE,
        "mgpr: error: writing results to",
        "No space left on device",
        "free disk space, then re-run the same command with output_dir=",
    )
    # The good results stay byte-identical (run.json and report_parts/ are the resumed run's
    # working state and are rewritten).
    final = {
        k: v
        for k, v in before.items()
        if k.startswith("run/")
        and k.split("/")[1] in ("predictions.gpkg", "summary.json", "report.json")
    }
    assert len(final) == 3
    _assert_untouched(final, tmp_path)
    assert not list(run.glob(".tmp-*"))  # no partial GeoPackage left behind


def _gpkg_disk_full(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """GDAL's GeoPackage insert fails as on a full $TMPDIR (pyogrio's FeatureError)."""
    import pyogrio.raw
    from pyogrio.errors import FeatureError

    def full(*args, **kwargs):
        raise FeatureError("sqlite3_exec(INSERT INTO ...) failed: database or disk is full")

    monkeypatch.setattr(pyogrio.raw, "write", full)
    return ["model=reference", "overlap=32"]


def _cog_block_write_fails(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """GDAL's COG copy fails on a block write without the OS's reason, on a nearly full disk."""
    from rasterio._err import CPLE_AppDefinedError

    import mgpr.run.failures
    import mgpr.tasks.segmentation

    def fails(*args, **kwargs):
        raise CPLE_AppDefinedError(3, 1, "band 1: An error occurred while writing a dirty block")

    monkeypatch.setattr(mgpr.tasks.segmentation, "assemble_cog", fails)
    monkeypatch.setattr(mgpr.run.failures, "LOW_FREE_BYTES", float("inf"))  # "nearly full"
    return ["model=reference-seg", "overlap=32"]


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (_gpkg_disk_full, "stopped on the disk is full (FeatureError: "),
        (_cog_block_write_fails, "stopped on a file-system error, probably a full disk"),
    ],
    ids=["gpkg-in-tmpdir", "cog-assembly"],
)
def test_a_full_disk_at_the_merge_is_one_line_and_the_rerun_only_merges(
    fault, said: str, make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    img = make_image(width=256, height=256, objects=3)
    run = tmp_path / "run"
    args = [f"input_path={img.path}", "tile_size=128", "workers=0", f"output_dir={run}"]
    with monkeypatch.context() as patch:
        extra = fault(patch)
        rc, _, err = _run(capsys, *args, *extra)
    last = _last_line(err, rc, EXIT_USAGE, said, "free space: ", f"kept in {run / 'parts'}")
    assert f"re-run the same command with output_dir={run} to resume" in last
    assert len(finished_tile_keys(run)) == 9  # every tile published before the merge
    assert not (run / "summary.json").exists()
    rc, out, err = _run(capsys, *args, *extra)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tiles_predicted"] + summary["tiles_skipped_nodata"] == 9
    assert "resuming the run" in out + err


def test_nan_model_output_fails_those_tiles_not_the_results(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A NaN logit (half-precision overflow) became class 0 silently; now a failed tile."""
    (tmp_path / "mgpr_nan_right.py").write_text(
        textwrap.dedent(
            """
            import torch

            class NaNOnBright(torch.nn.Module):
                task = "classification"
                def forward(self, x):
                    m = x.mean(dim=(1, 2, 3))
                    out = torch.stack([m, 1 - m], dim=1)
                    if torch.is_autocast_enabled("cpu"):
                        out[m > 0.6] = float("nan")  # bright tiles overflow in bf16
                    return out

            def build(weights):
                return NaNOnBright()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import numpy as np
    import rasterio

    img = make_image(width=256, height=128)
    with rasterio.open(img.path, "r+") as dst:  # the right tile white, the left one as it is
        dst.write(np.full((3, 128, 128), 250, np.uint8), window=((0, 128), (128, 256)))
    run = tmp_path / "run"
    args = [f"input_path={img.path}", "model=mgpr_nan_right:build", "tile_size=128", "workers=0"]
    args += [f"output_dir={run}", "progress=false"]
    rc, out, err = _run(capsys, *args, "precision=bf16-mixed")
    assert rc == EXIT_TILES_FAILED, err
    rows = (run / "failed_tiles.csv").read_text().splitlines()
    assert rows[1].startswith(f"{img.path}::r0c1,the model's output holds NaN (precision ")
    assert "re-run with precision=32" in rows[1] and len(rows) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tiles_predicted"] == 1 and summary["tiles_failed"] == 1
    assert "returned NaN for 1 tile(s)" in out + err
    # as the line says: precision=32 retries only that tile, and the run is whole
    rc, out, err = _run(capsys, *args, "precision=32")
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tiles_predicted"] == 2 and summary["tiles_failed"] == 0
    assert not (run / "failed_tiles.csv").exists()  # the earlier list is no longer true


def test_a_file_system_error_with_room_on_both_disks_does_not_say_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GDAL/SQLite write error on disks with room (a failed ALTER TABLE, a read-only mount)
    must not send the user to free space they have."""
    from pyogrio.errors import FieldError

    from mgpr.run.failures import file_system_error

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    line = str(file_system_error(FieldError("Error adding field 'x'"), tmp_path, 0))
    assert "stopped on a file-system error (FieldError: Error adding field 'x')" in line
    assert "both disks have room, so check that they are mounted and writable" in line
    assert "free space (or choose" not in line and line.endswith("to resume")


def test_which_errors_count_as_file_system_errors() -> None:
    import sqlite3

    from mgpr.errors import OutputError
    from mgpr.run.failures import is_file_system_error

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer from exc
        except BaseException as exc:
            return exc

    assert is_file_system_error(OSError(28, "No space left on device"))
    assert is_file_system_error(sqlite3.OperationalError("database or disk is full"))
    assert is_file_system_error(chained(RuntimeError("write failed"), OSError(122, "quota")))
    # a dying rank's store connection, a timeout, mgpr's own errors, a plain bug: not disk
    assert not is_file_system_error(ConnectionResetError(104, "Connection reset by peer"))
    assert not is_file_system_error(chained(RuntimeError("store"), TimeoutError()))
    assert not is_file_system_error(OutputError("already one line"))
    assert not is_file_system_error(ValueError("a bug"))


def test_sigterm_before_predict_is_one_line_not_a_traceback(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    """srun --kill-on-bad-exit TERMs every rank when one fails, often while it still imports
    or builds its model: that rank must stop with the same one line as mid-run (CI once showed
    a traceback from inside an import)."""
    model = _write_module(
        tmp_path,
        "mgpr_term_model",
        """
        import os
        import signal

        def build(weights):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model is being built
            raise AssertionError("SIGTERM did not stop the run")
    """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image(width=128, height=128)
    run = tmp_path / "run"
    rc, _, err = _run(
        capsys, f"input_path={img.path}", f"model={model}", f"output_dir={run}", "workers=0"
    )
    _last_line(
        err,
        rc,
        EXIT_INTERRUPTED,
        "interrupted by SIGTERM",
        f"command with output_dir={run} to resume",
    )
    assert not (run / "parts").exists()
    assert "no tile had finished yet" in err and "every finished tile is kept" not in err
    # Without output_dir= the same command would start over in a new runs/<time stamp> (a
    # resubmitted job in runs/slurm-<new id>): the line names the directory to resume.
    log = (run / "logs" / "rank0.log").read_text()  # the line is the log's last word too
    assert log.strip().splitlines()[-1].endswith(f"output_dir={run} to resume")
    assert "WARNING mgpr: mgpr: interrupted by SIGTERM" in log
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MGPR_RUN_DIR")  # the first run's, as for the ranks it launches
    rc, _, err = _run(capsys, f"input_path={img.path}", f"model={model}", "workers=0")
    (stamped,) = (tmp_path / "runs").iterdir()
    _last_line(err, rc, EXIT_INTERRUPTED, f"same command with output_dir={stamped} to resume")


@pytest.mark.slow
def test_sigterm_keeps_finished_tiles_and_the_rerun_completes(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    model = _write_module(
        tmp_path,
        "mgpr_slow_model",
        """
        import os
        import time

        import torch

        class Slow(torch.nn.Module):
            task = "classification"
            in_bands = 3

            def forward(self, x):
                time.sleep(float(os.environ.get("MGPR_TEST_DELAY_S", "0")))
                return torch.zeros(x.shape[0], 2)

        def build(weights):
            return Slow()
    """,
    )
    img = make_image(width=256, height=256)  # 16 tiles of 64 px, one per batch
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        f"model={model}",
        "tile_size=64",
        "batch_size=1",
        "workers=0",
        f"output_dir={run}",
        "progress=false",
    ]
    env = subprocess_env(PYTHONPATH=str(tmp_path), MGPR_TEST_DELAY_S="0.5")
    proc = subprocess.Popen(
        mgpr_cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240  # a guard against hanging, not a timing assertion
    done = 0
    while done < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        done = len(finished_tile_keys(run))
    assert done >= 2 and proc.poll() is None, "the run did not get going"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = _last_line(
        err,
        proc.returncode,
        EXIT_INTERRUPTED,
        "interrupted by SIGTERM",
        str(run / "parts"),
        f"re-run the same command with output_dir={run} to resume",
    )
    assert last.startswith("mgpr: interrupted")
    kept, distinct, _ = _part_tiles(run)
    assert 2 <= kept == distinct < 16
    report = json.loads((run / "report.json").read_text())  # how it went until the stop
    assert report["interrupted_ranks"] == [0] and report["ranks"][0]["tiles"] >= kept, report
    assert report["ranks"][0]["error"] == "RunInterrupted: SIGTERM", report
    # The re-run (in-process, no delay) predicts only the other tiles.
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MGPR_TEST_DELAY_S", "0")
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    log = (run / "logs" / "rank0.log").read_text()
    assert f"{kept} of the 16 planned tiles were finished" in log
    assert _part_tiles(run) == (16, 16, 16)
    assert _summary(run)["tiles_predicted"] == 16


def test_dead_dataloader_worker_is_one_line_and_the_rerun_resumes(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A worker killed by SIGBUS (what running out of /dev/shm looks like) mid-run."""
    from mgpr.geo.raster import TileReader

    parent = os.getpid()
    original = TileReader.read

    def read_then_die(self, tile, out=None):  # type: ignore[no-untyped-def]
        if os.getpid() != parent and tile.row_off >= 128:  # the worker, half-way through
            os.kill(os.getpid(), signal.SIGBUS)
        return original(self, tile, out)

    monkeypatch.setattr(TileReader, "read", read_then_die)
    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        "model=null",
        "tile_size=64",
        "batch_size=4",
        f"output_dir={run}",
        "progress=false",
    ]
    rc, _, err = _run(capsys, *args, "workers=2")
    _last_line(
        err, rc, EXIT_USAGE, "DataLoader worker", "/dev/shm", str(run / "parts"), "workers=1"
    )
    monkeypatch.setattr(TileReader, "read", original)
    rc, out, err = _run(capsys, *args, "workers=2")
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["tiles_predicted"] == 16


def test_a_batch_beyond_the_machines_memory_is_refused_before_any_work(
    make_image, tmp_path: Path, monkeypatch, capsys
) -> None:
    """One batch of carrier tiles is a lower bound of the host memory a run needs: beyond the
    node's memory it is one line naming tile_size (and batch_size while it is above 1)."""
    from mgpr.data.batch_pool import batch_beyond_memory

    assert batch_beyond_memory(8, 3, 512, 1, 2**30) is None  # 6 MiB of 1 GiB
    assert batch_beyond_memory(8, 3, 512, 1, None) is None  # unknown memory: nothing said
    line = batch_beyond_memory(1, 4, 100_000, 2, 24 * 2**30, (512, 700))
    assert line == (
        "tile_size=100000 with batch_size=1 needs 74.5 GiB of host memory for one batch of tiles "
        "alone (1 x 4 band(s) x 100000^2 px x 2 B), more than this machine's 24.0 GiB; lower "
        "tile_size (the largest input is 700 x 512 px)"
    )
    img = make_image("small.tif", width=300, height=200)
    monkeypatch.setattr("mgpr.monitor.part.host_memory_total", lambda: 4 * 2**20)  # 4 MiB
    run = tmp_path / "run"
    args = (f"input_path={img.path}", "model=reference", "workers=0", f"output_dir={run}")
    assert run_mgpr_inprocess(*args, "tile_size=512", "batch_size=8") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "mgpr: error: tile_size=512 with batch_size=8 needs 6.0 MiB of host memory for one "
        "batch of tiles alone (8 x 3 band(s) x 512^2 px x 1 B), more than this machine's 4.0 "
        "MiB; lower tile_size (the largest input is 300 x 200 px) or batch_size"
    ), err
    assert sorted(p.name for p in run.iterdir()) == ["logs"]  # nothing written
    assert run_mgpr_inprocess(*args, "tile_size=256", "batch_size=4") == 0  # 0.75 MiB fits


def test_a_long_error_keeps_both_ends_and_whole_words() -> None:
    """A full disk's SQLite error was cut to "... database or disk": its end says what
    happened, so a long error keeps its start and its end around "...", never half a word."""
    from mgpr.run.failures import _clipped

    text = (
        "sqlite3.OperationalError while writing the features of /a/very/long/path/to/a/run/"
        "directory/predictions.gpkg into table detections_epsg32633: database or disk is full"
    )
    short = _clipped(text, 100)
    assert len(short) <= 100 and short.endswith("database or disk is full")
    assert short.startswith("sqlite3.OperationalError while writing") and " ... " in short
    assert all(word in text.split(" ") for word in short.replace(" ... ", " ").split(" "))
    assert _clipped("fits", 100) == "fits"
    assert _clipped("x" * 300, 50) == "x" * 47 + "..."
