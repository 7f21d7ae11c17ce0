"""Start-up warnings on the inputs: pixel coordinates, padding past small inputs, seams."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_mgpr_inprocess

from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.run.input_warnings import has_seams, padding_warning, warn_ungeoreferenced


def _plan(make_image, sizes: list[tuple[int, int]], tile_size: int):
    rasters = [
        describe_raster(str(make_image(f"r{i}.tif", height=h, width=w).path))
        for i, (h, w) in enumerate(sizes)
    ]
    tiles = [t for r in rasters for t in plan_tiles(r.path, r.height, r.width, tile_size, 0)]
    return rasters, tiles


def test_chips_under_a_large_tile_size_get_the_size_that_fits(make_image) -> None:
    rasters, tiles = _plan(make_image, [(64, 64), (48, 70)], 512)
    text = padding_warning(rasters, tiles, 512)
    assert text is not None
    # (64*64 + 48*70) / (2 * 512^2) valid: 98.6 % padding, 70.3x the pixels
    assert text.startswith("99% of the planned tiles' pixels are zero padding")
    assert "2 of 2 input(s) are smaller than tile_size=512; the largest is 70 x 48 px" in text
    assert "70.3x the pixels" in text and text.endswith(
        "set tile_size=96 to predict each input in one tile of about its size"
    )
    assert not has_seams(tiles)


def test_a_large_raster_and_its_edge_tiles_warn_nothing(make_image) -> None:
    rasters, tiles = _plan(make_image, [(1000, 1100)], 256)  # 4 x 5 tiles, 16 % padding
    assert padding_warning(rasters, tiles, 256) is None
    assert has_seams(tiles)
    assert padding_warning(rasters, [], 256) is None


def test_inputs_just_past_one_tile_are_told_to_fit_it_otherwise(make_image) -> None:
    rasters, tiles = _plan(make_image, [(300, 300)], 256)  # 4 tiles, 34 % of them valid
    text = padding_warning(rasters, tiles, 256)
    assert text is not None and "0 of 1 input(s) are smaller than tile_size=256" in text
    assert text.endswith(  # 160 px tiles: 2 x 2 of them, 12 % padding
        "set tile_size=160 (about 12% padding, edge tiles counted without overlap) or choose "
        "another that fits the inputs (the largest is 300 x 300 px)"
    )


def test_a_strip_thinner_than_a_tile_is_told_the_tile_size_with_least_padding(
    make_image,
) -> None:
    """40 x 3000 px under 512 px tiles: 92 % padding; 64 px tiles pad 38 % (no size does
    better: a strip pads any square tile); a size is named, width x height."""
    rasters, tiles = _plan(make_image, [(3000, 40)], 512)
    text = padding_warning(rasters, tiles, 512)
    assert text is not None and "the largest is 40 x 3000 px" in text
    assert "set tile_size=64 (about 38% padding" in text
    from mgpr.run.input_warnings import smaller_tile_size

    assert smaller_tile_size([(1000, 1000)], 256, 0.6) == (
        224,
        pytest.approx(1 - 1e6 / (5 * 5 * 224**2)),
    )
    assert smaller_tile_size([(33, 33)], 64, 0.73) is None  # 32 px tiles: 4 of them, 73 %


def test_a_strip_one_pixel_high_is_told_no_tile_size_helps(make_image) -> None:
    rasters, tiles = _plan(make_image, [(1, 1024)], 256)
    text = padding_warning(rasters, tiles, 256)
    assert text is not None and text.endswith(
        "no smaller tile_size pads clearly less, since the inputs are thinner than tiles (the "
        "thinnest is 1024 x 1 px): the padding costs compute, not correctness"
    )


def test_a_folder_of_chips_warns_of_padding_once_and_not_of_seams(
    make_image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        make_image(
            f"chips/c{i}.tif",
            width=64,
            height=64,
            objects=1,
            seam_share=0,
            object_max_px=16,
            seed=i,
        )
    run = tmp_path / "run"
    common = [f"input_path={tmp_path / 'chips'}", "model=reference", "workers=0", "previews=none"]
    assert run_mgpr_inprocess(*common, f"output_dir={run}") == 0
    err = capsys.readouterr().err
    assert err.count("zero padding") == 1
    assert "98% of the planned tiles' pixels are zero padding" in err
    assert "set tile_size=64 to predict each input" in err
    assert "objects cut by a tile seam" not in err  # one tile a chip: no seam
    assert run_mgpr_inprocess(*common, f"output_dir={run}2", "tile_size=64") == 0
    assert "zero padding" not in capsys.readouterr().err
    # a raster of several tiles keeps the seam warning
    big = make_image("big.tif", width=512, height=512)
    assert run_mgpr_inprocess(
        f"input_path={big.path}", "model=reference", "workers=0", "previews=none",
        "tile_size=256", f"output_dir={run}3",
    ) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "objects cut by a tile seam" in err and "zero padding" not in err


def test_inputs_without_a_crs_are_named_a_few_then_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of 20,000 PNG chips printed 20,000 'has no CRS' lines."""
    import warnings

    import numpy as np
    import rasterio

    paths = []
    for i in range(5):
        path = tmp_path / f"c{i}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rasterio: NotGeoreferencedWarning
            with rasterio.open(
                path, "w", driver="PNG", width=16, height=16, count=3, dtype="uint8"
            ) as dst:
                dst.write(np.zeros((3, 16, 16), np.uint8))
        paths.append(str(path))
    rasters = [describe_raster(p) for p in paths]
    with caplog.at_level("WARNING", logger="mgpr"):
        warn_ungeoreferenced(rasters)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        *(f"{p} has no CRS: its results are in pixel coordinates (x = column, y = row)"
          for p in paths[:3]),
        "... and 2 more input(s) without a CRS (in pixel coordinates too)",
    ]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="mgpr"):
        warn_ungeoreferenced(rasters[:3])
    assert len(caplog.records) == 3 and "more input" not in caplog.text


def test_gsd_model_grids_of_many_inputs_are_named_a_few_then_counted(
    make_image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(5):
        make_image(f"chips/c{i}.tif", width=64, height=64, objects=0, seed=i)
    args = [f"input_path={tmp_path / 'chips'}", "model=reference", "workers=0", "previews=none"]
    rc = run_mgpr_inprocess(*args, "gsd=0.2", "tile_size=32", f"output_dir={tmp_path / 'run'}")
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("-> model grid") == 3
    assert "... and 2 more input(s) on model grids (summary.json resolution)" in err


def test_band_choices_of_many_inputs_are_noted_a_few_of_each_kind(
    make_image, caplog: pytest.LogCaptureFixture
) -> None:
    from mgpr.geo.bands import check_bands
    from mgpr.run.input_warnings import log_notes

    notes: list[tuple[str, str]] = []
    infos = [
        describe_raster(str(make_image(f"n{i}.tif", width=32, height=32, bands=4).path))
        for i in range(5)
    ]
    for info in infos:
        assert check_bands(info, None, 3, notes) == [1, 2, 3]
    assert len(notes) == 5
    with caplog.at_level("INFO", logger="mgpr"):
        log_notes(notes, "input(s) whose bands are chosen so too")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[-1] == "... and 2 more input(s) whose bands are chosen so too"
    assert all("bands 1..3" in ln or "colour interpretation" in ln for ln in lines[:3])
