"""input_path -> rasters: every file once, whatever names it is listed under."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import read_gpkg_layer, run_mgpr_inprocess

from mgpr.errors import InputError
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
    import rasterio

    assert summary["provenance"]["versions"]["gdal"] == rasterio.__gdal_version__
    # a self-contained GeoTIFF records no ``sources``, so run.json files of older runs resume
    (ident,) = json.loads((run / "run.json").read_text())["fingerprint"]["inputs"]
    assert "sources" not in ident
    geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert len(geoms) == 6


def _mosaic_vrt(folder: Path, sources: list[Path], width: int, height: int) -> Path:
    """A VRT placing ``sources`` (same height, width // len(sources) each) side by side."""
    import rasterio

    with rasterio.open(sources[0]) as src:
        crs, t = src.crs.to_wkt(), src.transform
    step = width // len(sources)
    bands = ""
    for b in (1, 2, 3):
        blocks = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{p.name}</SourceFilename>'
            f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{step}" '
            f'ySize="{height}"/><DstRect xOff="{i * step}" yOff="0" xSize="{step}" '
            f'ySize="{height}"/></SimpleSource>'
            for i, p in enumerate(sources)
        )
        bands += f'<VRTRasterBand dataType="Byte" band="{b}">{blocks}</VRTRasterBand>'
    vrt = folder / "mosaic.vrt"
    vrt.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs}</SRS>'
        f"<GeoTransform>{t.c},{t.a},0,{t.f},0,{t.e}</GeoTransform>{bands}</VRTDataset>"
    )
    return vrt


def test_a_vrt_resumes_only_while_its_sources_are_unchanged(
    make_image, tmp_path: Path, capsys
) -> None:
    """The .vrt keeps its size and mtime when a source tile is replaced: the sources count."""
    left = make_image("mosaic/left.tif", width=128, height=128, seed=1)
    right = make_image("mosaic/right.tif", width=128, height=128, seed=2)
    vrt = _mosaic_vrt(tmp_path / "mosaic", [left.path, right.path], 256, 128)
    run = tmp_path / "run"
    args = (f"input_path={vrt}", "model=null", "tile_size=128", "workers=0", f"output_dir={run}")
    assert run_mgpr_inprocess(*args) == 0
    (ident,) = json.loads((run / "run.json").read_text())["fingerprint"]["inputs"]
    assert [(s["path"], s["bytes"]) for s in ident["sources"]] == [
        (str(left.path), left.path.stat().st_size),
        (str(right.path), right.path.stat().st_size),
    ]
    capsys.readouterr()
    assert run_mgpr_inprocess(*args) == 0  # unchanged: resumes
    os.utime(right.path, (1e9, 1e9))  # the source is replaced, the .vrt is not touched
    assert run_mgpr_inprocess(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"inputs[0] ('{vrt}').sources[1] ('{right.path}').mtime differs" in err, err


def test_a_vrt_with_a_missing_source_is_refused_before_any_tile(
    make_image, tmp_path: Path, capsys
) -> None:
    """GDAL opens it and reads zeros for the missing part after the first failed read: refused,
    also one VRT down (a mosaic of mosaics), whose sources a resume then compares too."""
    left = make_image("mosaic/left.tif", width=128, height=128, seed=1)
    right = make_image("mosaic/right.tif", width=128, height=128, seed=2)
    vrt = _mosaic_vrt(tmp_path / "mosaic", [left.path, right.path], 256, 128)
    outer = tmp_path / "outer.vrt"
    outer.write_text(_outer_vrt(vrt, 256, 128))
    from mgpr.geo.raster import describe_raster

    nested = describe_raster(str(outer))
    assert [p for p, _, _ in nested.source_files] == [str(vrt), str(left.path), str(right.path)]
    right.path.rename(right.path.with_name("moved.tif"))
    for given in (vrt, outer):
        run = tmp_path / f"run_{given.stem}"
        args = (f"input_path={given}", "model=null", "tile_size=128", "workers=0")
        assert run_mgpr_inprocess(*args, f"output_dir={run}") == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{str(given)!r} is a VRT whose source {str(right.path)!r} does not exist" in err
        assert "restore the file or fix its SourceFilename in the VRT" in err
        assert not (run / "predictions.gpkg").exists()
        log = (run / "logs" / "rank0.log").read_text().strip().splitlines()[-1]
        assert "ERROR mgpr: mgpr: error:" in log and "does not exist" in log  # kept there too


def _outer_vrt(inner: Path, width: int, height: int) -> str:
    """A VRT whose only source is another VRT (bands 1-3 of ``inner``, absolute path)."""
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename '
        f'relativeToVRT="0">{inner}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
        "</VRTRasterBand>"
        for b in (1, 2, 3)
    )
    head = (
        inner.read_text()
        .split("<VRTRasterBand")[0]
        .replace(
            '<VRTDataset rasterXSize="256" rasterYSize="128">',
            f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        )
    )
    return f"{head}{bands}</VRTDataset>"


def test_external_overviews_count_only_for_gsd_runs(make_image, tmp_path: Path) -> None:
    """Building a .ovr for QGIS between a run and its resume changes no native-pixel tile."""
    import dataclasses

    import rasterio
    from rasterio.enums import Resampling

    from mgpr.conf.schema import PredictConfig
    from mgpr.geo.raster import describe_raster
    from mgpr.run.identity import fingerprint

    img = make_image("ortho.tif", width=256, height=256)
    with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(img.path, "r+") as src:  # ortho.tif.ovr
        src.build_overviews([2, 4], Resampling.average)
    info = describe_raster(str(img.path))
    assert [Path(p).name for p, _, _ in info.source_files] == ["ortho.tif.ovr"]
    cfg = PredictConfig(input_path=str(img.path))
    (native,) = fingerprint(cfg, "null", "none", [info], {info.path: [1, 2, 3]})["inputs"]
    assert "sources" not in native
    gsd_cfg = dataclasses.replace(cfg, gsd=0.1)
    (resampled,) = fingerprint(gsd_cfg, "null", "none", [info], {info.path: [1, 2, 3]})["inputs"]
    assert [Path(s["path"]).name for s in resampled["sources"]] == ["ortho.tif.ovr"]


def test_a_glob_reads_what_its_folder_reads_unless_it_names_a_format(
    make_image, tmp_path: Path, caplog
) -> None:
    """`dir/*` over mgpr-test-image's output (a.tif, a_truth.gpkg) and a README: the raster only,
    with one line for the rest; a pattern naming an extension keeps every match."""
    from mgpr.errors import InputError

    img = make_image("d/a.tif", width=64, height=64, objects=1, seam_share=0)
    (tmp_path / "d" / "README.txt").write_text("notes")
    (tmp_path / "d" / "b.ecw").write_bytes(b"")
    (tmp_path / "d" / "notes").write_text("no suffix")  # kept before: "not a readable raster"
    assert (tmp_path / "d" / "a_truth.gpkg").exists()
    with caplog.at_level(logging.INFO, logger="mgpr.geo.inputs"):
        assert resolve_inputs(str(tmp_path / "d" / "*")) == [str(img.path)]
    assert "skipping 4 match(es) without a raster suffix" in caplog.text
    assert resolve_inputs(str(tmp_path / "d" / "*.ecw")) == [str(tmp_path / "d" / "b.ecw")]
    assert resolve_inputs(str(tmp_path / "d")) == [str(img.path)]  # the folder, as before
    with pytest.raises(InputError, match="the glob matches no raster .* 'README.txt'; name"):
        resolve_inputs(str(tmp_path / "d" / "R*"))


def test_a_glob_in_the_wrong_case_says_what_matches_ignoring_case(
    make_image, tmp_path: Path
) -> None:
    from mgpr.errors import InputError

    make_image("d/a.tif", width=64, height=64, objects=0)
    with pytest.raises(InputError) as err:
        resolve_inputs(str(tmp_path / "d" / "*.TIF"))
    assert "the glob matches no file (but 1 match ignoring case, e.g. 'a.tif': globs are " in str(
        err.value
    )
    with pytest.raises(InputError) as err:
        resolve_inputs(str(tmp_path / "d" / "*.ecw"))
    assert str(err.value).endswith("the glob matches no file; check the pattern")


def test_a_list_of_inputs_is_expanded_item_by_item_in_its_order(make_image, tmp_path: Path) -> None:
    """``input_path=[b.tif,tiles/]``: each item is what it would be alone (a file, a folder, a
    glob, a .txt list), concatenated in the list's order; a file named twice is kept once."""
    a = make_image("tiles/a.tif", width=64, height=64)
    c = make_image("tiles/c.tif", width=64, height=64)
    b = make_image("b.tif", width=64, height=64)
    listing = tmp_path / "one.txt"
    listing.write_text(f"{c.path}\n")
    paths = resolve_inputs([str(b.path), str(tmp_path / "tiles"), str(listing)])
    assert paths == [str(b.path), str(a.path), str(c.path)]
    with pytest.raises(InputError, match=r"input_path='.*missing\.tif' does not exist"):
        resolve_inputs([str(b.path), str(tmp_path / "missing.tif")])


def test_comma_separated_inputs_are_answered_with_the_list_spelling(
    make_image, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_image("a.tif", width=64, height=64)
    make_image("b.tif", width=64, height=64)
    with pytest.raises(InputError, match=r"write a list: input_path=\[a\.tif,b\.tif\]"):
        resolve_inputs("a.tif,b.tif")
    with pytest.raises(InputError, match=r"or a list \[a\.tif,b\.tif\]$"):
        resolve_inputs("a.tif,zz.tif")  # not every part exists: no guess


@pytest.mark.slow
def test_a_run_over_a_list_of_inputs_from_the_command_line(
    make_image, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_image("a.tif", width=256, height=256, objects=2)
    make_image("more/b.tif", width=256, height=256, objects=2, origin_x=600000.0, seed=1)
    run = tmp_path / "run"
    args = ("model=reference", "tile_size=128", "overlap=32", "workers=0", f"output_dir={run}")
    assert run_mgpr_inprocess("input_path=[a.tif,more/]", *args) == 0
    inputs = [
        Path(i["path"]).name
        for i in json.loads((run / "run.json").read_text())["fingerprint"]["inputs"]
    ]
    assert inputs == ["a.tif", "b.tif"]
    _geoms, rows, _epsg = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert {Path(r["source"]).name for r in rows} == {"a.tif", "b.tif"}
    # The same inputs again resume (nothing left to predict), whatever the list's spelling
    assert run_mgpr_inprocess("input_path=[a.tif,more/b.tif]", *args) == 0


def test_a_list_file_names_files_folders_and_globs(make_image, tmp_path: Path) -> None:
    """A line naming a folder was refused as 'does not exist' (it exists: as a folder)."""
    x = make_image("flights/f1/x.tif", width=64, height=64)
    y = make_image("flights/f2/y.tif", width=64, height=64)
    z = make_image("z.tif", width=64, height=64)
    listing = tmp_path / "l.txt"
    listing.write_text("flights/f1\nflights/f2/*.tif\nz.tif\n")
    assert resolve_inputs(str(listing)) == [str(x.path), str(y.path), str(z.path)]
    (tmp_path / "nested.txt").write_text("l.txt\n")
    with pytest.raises(InputError, match=r"nested\.txt:1 names another list, 'l\.txt'"):
        resolve_inputs(str(tmp_path / "nested.txt"))
    (tmp_path / "bad.txt").write_text("# flights\n\nflights/f3/*.tif\n")
    with pytest.raises(InputError, match=r"bad\.txt:3: input_path=.*glob matches no file"):
        resolve_inputs(str(tmp_path / "bad.txt"))


def test_a_folder_whose_rasters_are_in_subfolders_says_how_to_read_them(
    make_image, tmp_path: Path
) -> None:
    make_image("flights/f1/x.tif", width=64, height=64)
    with pytest.raises(InputError) as err:
        resolve_inputs(str(tmp_path / "flights"))
    assert "its subfolders hold rasters (e.g. 'f1/x.tif')" in str(err.value)
    assert f"input_path='{tmp_path / 'flights'}/**/*.tif'" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="point it at a folder of GeoTIFFs"):
        resolve_inputs(str(tmp_path / "empty"))


def test_a_folder_of_png_or_jpeg_chips_says_the_glob_that_reads_them(tmp_path: Path) -> None:
    import numpy as np
    import rasterio

    chips = tmp_path / "chips"
    chips.mkdir()
    for name, driver in [("b.png", "PNG"), ("a.png", "PNG"), ("c.jpg", "JPEG")]:
        with rasterio.open(
            chips / name, "w", driver=driver, width=32, height=32, count=3, dtype="uint8"
        ) as dst:
            dst.write(np.full((3, 32, 32), 100, np.uint8))
    (chips / "notes.md").write_text("not an image")
    with pytest.raises(InputError) as err:
        resolve_inputs(str(chips))
    assert "it holds 2 .png file(s) (e.g. 'a.png'), which a folder input does not read" in str(
        err.value
    )
    glob = f"{chips}/*.png"
    assert f"name them with input_path='{glob}'" in str(err.value)
    assert resolve_inputs(glob) == [str(chips / "a.png"), str(chips / "b.png")]


@pytest.mark.slow
def test_a_copied_input_is_refused_with_the_touch_that_resumes_it(
    make_image, tmp_path: Path, monkeypatch, capsys
) -> None:
    """cp without -p (restaging to scratch) keeps the bytes and changes the mtime: the refusal
    says how to give the time back, and after that `touch` the same command resumes."""
    import re
    import shutil
    import subprocess

    monkeypatch.chdir(tmp_path)
    make_image("a.tif", width=256, height=256, objects=2)
    args = ("input_path=a.tif", "model=reference", "tile_size=128", "workers=0", "output_dir=run")
    assert run_mgpr_inprocess(*args) == 0
    shutil.copyfile("a.tif", "copy.tif")
    os.replace("copy.tif", "a.tif")  # same bytes, a new mtime
    capsys.readouterr()
    assert run_mgpr_inprocess(*args) == 2
    err = capsys.readouterr().err
    assert "inputs[0] ('a.tif').mtime differs: 'a.tif' has the same size" in err, err
    touch = re.search(r"`(touch -d @[0-9.]+ a\.tif)`", err)
    assert touch, err
    subprocess.run(touch.group(1).split(), check=True)
    assert run_mgpr_inprocess(*args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tiles_this_run"] == 0
    assert summary["tiles_earlier_runs"] == summary["tiles_total"] > 1


def test_a_resume_names_each_input_as_the_run_it_resumes(
    make_image, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The same file under another name (absolute after relative, a symlink) resumes under the
    earlier name: no tile is predicted again and the layer's source column keeps one spelling.
    From another directory the earlier relative name is another file; the refusal says where
    that run was started."""
    monkeypatch.chdir(tmp_path)
    make_image("a.tif", width=256, height=256, objects=2)
    (tmp_path / "link.tif").symlink_to(tmp_path / "a.tif")
    common = ("model=reference", "tile_size=128", "workers=0", f"output_dir={tmp_path / 'run'}")
    assert run_mgpr_inprocess("input_path=a.tif", *common) == 0
    for other in (str(tmp_path / "a.tif"), "./a.tif", "link.tif"):
        assert run_mgpr_inprocess(f"input_path={other}", *common) == 0, other
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["tiles_this_run"] == 0, other
        assert summary["tiles_earlier_runs"] == summary["tiles_total"] == 4
        assert [i["path"] for i in summary["provenance"]["inputs"]] == ["a.tif"]
    _, rows, _ = read_gpkg_layer(tmp_path / "run" / "predictions.gpkg", "detections")
    assert len(rows) == 2 and {r["source"] for r in rows} == {"a.tif"}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert run_mgpr_inprocess("input_path=../a.tif", *common) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 no longer listed: 'a.tif'; 1 new: '../a.tif'" in err, err
    assert f"that run named its inputs ('a.tif', ...) relative to {tmp_path}: run from there" in err


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_folder_or_glob_inside_an_archive_reads_its_rasters(
    make_image, tmp_path: Path, kind: str
) -> None:
    """GDAL lists no folder inside a zip for mgpr, so /vsizip/a.zip/sub was "not a readable
    raster": a local archive's members are listed, a folder reads as a folder does."""
    import tarfile
    import zipfile

    a = make_image("src/a.tif", width=64, height=64)
    b = make_image("src/b.tif", width=64, height=64, seed=1)
    (tmp_path / "src" / "notes.txt").write_text("not a raster")
    members = {"top.tif": a.path, "sub/b.tif": b.path, "sub/deeper/a.tif": a.path}
    members["sub/notes.txt"] = tmp_path / "src" / "notes.txt"
    if kind == "zip":
        archive, prefix = tmp_path / "orthos.zip", "/vsizip/"
        with zipfile.ZipFile(archive, "w") as z:
            for name, path in members.items():
                z.write(path, name)
    else:
        archive, prefix = tmp_path / "orthos.tar", "/vsitar/"
        with tarfile.open(archive, "w") as t:
            for name, path in members.items():
                t.add(path, name)
    root = f"{prefix}{archive}"
    assert resolve_inputs(f"{root}/sub") == [f"{root}/sub/b.tif"]  # not its subfolders
    assert resolve_inputs(root) == [f"{root}/top.tif"]
    assert resolve_inputs(f"{root}/*.tif") == [
        f"{root}/sub/b.tif", f"{root}/sub/deeper/a.tif", f"{root}/top.tif"
    ]  # fmt: skip
    assert resolve_inputs(f"{root}/sub/b.tif") == [f"{root}/sub/b.tif"]  # a member as it is
    with pytest.raises(InputError, match=r"the folder holds no raster in .*orthos\.(zip|tar) \(3"):
        resolve_inputs(f"{root}/empty")
    with pytest.raises(InputError, match=r"no member of that name is in .*orthos\.(zip|tar) \(3"):
        resolve_inputs(f"{root}/sub/typo.tif")
    from mgpr.geo.raster import describe_raster

    info = describe_raster(f"{root}/sub/b.tif")  # GDAL reads what was listed
    assert info.width == 64 and info.file_bytes == archive.stat().st_size  # a resume's check
