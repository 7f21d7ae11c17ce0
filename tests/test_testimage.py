"""Tests of the synthetic test-image generator (mgpr.testimage) and its CLI (mgpr-test-image).

Every test writes real GeoTIFFs / GeoPackages into ``tmp_path``; images are small (<= 1024^2).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.enums import ColorInterp, Compression, MaskFlags
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from typer.testing import CliRunner

from mgpr.cli.testimage import app, parse_overrides
from mgpr.errors import EXIT_USAGE, ConfigError, InputError, OutputError
from mgpr.testimage import (
    BACKGROUND_MAX,
    OBJECT_GAP_PX,
    OBJECT_VALUE_MIN,
    PlantedObject,
    TestImageResult,
    TestImageSpec,
    nodata_mask,
    place_objects,
    read_truth,
    render_block,
    seam_positions,
    truth_path_for,
    write_test_image,
)

# rasterio's own from_origin (used here as the independent reference) still uses Affine's `*`.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")

# A size that does not divide by the block size nor by the tile stride.
H, W = 700, 900


def _write(tmp_path: Path, name: str = "img.tif", **kw: object) -> TestImageResult:
    spec = TestImageSpec(**{"height": H, "width": W, **kw})  # type: ignore[arg-type]
    return write_test_image(tmp_path / name, spec)


def _read(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


# ------------------------------------------------------------------ determinism and content


def test_same_seed_same_pixels_other_seed_differs(tmp_path: Path) -> None:
    a = _read(_write(tmp_path, "a.tif", seed=3, objects=5).path)
    b = _read(_write(tmp_path, "b.tif", seed=3, objects=5).path)
    c = _read(_write(tmp_path, "c.tif", seed=4, objects=5).path)
    assert a.tobytes() == b.tobytes()
    assert (a != c).mean() > 0.5


def test_content_is_seamless_and_independent_of_block_size(tmp_path: Path) -> None:
    spec = TestImageSpec(height=H, width=W, block_size=256, objects=6, nodata="rect")
    res = write_test_image(tmp_path / "b256.tif", spec)
    small = _read(res.path)
    big = _read(
        write_test_image(tmp_path / "b512.tif", dataclasses.replace(spec, block_size=512)).path
    )
    assert small.tobytes() == big.tobytes()
    # One render of the whole raster equals the block-by-block file.
    whole = render_block(spec, 0, 0, H, W, res.objects)
    np.testing.assert_array_equal(whole, small)


def test_background_range_and_orthomosaic_like_statistics(tmp_path: Path) -> None:
    arr = _read(_write(tmp_path).path)
    assert arr.max() <= BACKGROUND_MAX
    assert arr.min() >= 1  # valid pixels are never the nodata value 0
    for band in arr.astype(np.float64):
        assert band.std() > 10  # not constant
        # Neighbouring pixels are strongly correlated (not noise), yet not identical.
        left, right = band[:, :-1].ravel(), band[:, 1:].ravel()
        assert np.corrcoef(left, right)[0, 1] > 0.6
        assert (left != right).mean() > 0.5


def test_compression_ratio_like_an_orthomosaic(tmp_path: Path) -> None:
    res = write_test_image(tmp_path / "r.tif", TestImageSpec(width=1024, height=1024))
    assert res.raw_bytes == 1024 * 1024 * 3
    assert res.file_bytes == res.path.stat().st_size
    assert 1.5 < res.compression_ratio < 20


# ------------------------------------------------------------------ file format


def test_crs_transform_tiling_compression(tmp_path: Path) -> None:
    res = _write(tmp_path)
    with rasterio.open(res.path) as src:
        assert src.crs.to_epsg() == 32633
        assert src.crs.is_projected
        assert src.transform == from_origin(500000.0, 5000000.0, 0.1, 0.1)
        assert src.res == (0.1, 0.1)
        assert (src.height, src.width, src.count) == (H, W, 3)
        assert src.dtypes == ("uint8",) * 3
        assert src.block_shapes == [(512, 512)] * 3
        assert src.profile["tiled"]
        assert src.compression == Compression.deflate
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
        assert src.nodata is None
        assert src.overviews(1) == []


def test_custom_georeference_zstd_and_overviews(tmp_path: Path) -> None:
    spec = TestImageSpec(
        width=1024,
        height=600,
        crs="EPSG:25832",
        pixel_size=0.25,
        origin_x=4e5,
        origin_y=5.6e6,
        compress="zstd",
        overviews=True,
    )
    res = write_test_image(tmp_path / "z.tif", spec)
    with rasterio.open(res.path) as src:
        assert src.crs.to_epsg() == 25832
        assert src.transform == from_origin(4e5, 5.6e6, 0.25, 0.25)
        assert src.compression == Compression.zstd
        assert src.overviews(1) == [2, 4]


def test_small_image_block_shape(tmp_path: Path) -> None:
    res = write_test_image(tmp_path / "s.tif", TestImageSpec(width=100, height=60))
    with rasterio.open(res.path) as src:
        assert src.block_shapes[0] in ((512, 512), (60, 100))
        assert src.shape == (60, 100)


@pytest.mark.parametrize("bands", [1, 2, 3, 4])
def test_band_counts(tmp_path: Path, bands: int) -> None:
    res = write_test_image(
        tmp_path / f"b{bands}.tif", TestImageSpec(width=200, height=130, bands=bands, objects=2)
    )
    arr = _read(res.path)
    assert arr.shape == (bands, 130, 200) and arr.dtype == np.uint8
    for o in res.objects:
        assert (arr[:, o.row_min : o.row_max, o.col_min : o.col_max] >= 240).all()


def test_crs_none_is_pixel_only(tmp_path: Path) -> None:
    res = _write(tmp_path, crs="none", objects=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(res.path) as src:
            assert src.crs is None
            assert src.transform.is_identity
    assert res.truth_path is not None
    info = pyogrio.read_info(res.truth_path, layer="objects")
    assert info["crs"] is None
    geoms = pyogrio.raw.read(res.truth_path, layer="objects")[2]
    for o, wkb in zip(res.objects, geoms, strict=True):
        assert shapely.from_wkb(wkb).bounds == (o.col_min, o.row_min, o.col_max, o.row_max)


@pytest.mark.parametrize("crs", ["32632", 32632])
def test_a_bare_epsg_number_is_that_epsg_code(tmp_path: Path, crs: object) -> None:
    """crs=32633 passed pyproj's check and then failed in GDAL's writer with a traceback."""
    res = _write(tmp_path, crs=crs)
    with rasterio.open(res.path) as src:
        assert src.crs.to_epsg() == 32632


def test_atomic_overwrite_parents_and_stale_truth(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "dir" / "img.tif"
    first = write_test_image(out, TestImageSpec(width=300, height=300, objects=3))
    assert first.truth_path == truth_path_for(out) == out.with_name("img_truth.gpkg")
    assert first.truth_path.is_file()
    second = write_test_image(out, TestImageSpec(width=300, height=300, seed=1))
    assert second.truth_path is None and second.objects == ()
    assert not truth_path_for(out).exists()  # stale truth removed
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.tif"]  # no temp files left
    assert out.stat().st_mode & 0o044  # normal permissions, not mkstemp's 0600


# ------------------------------------------------------------------ nodata


@pytest.mark.parametrize("region", ["border", "rect"])
@pytest.mark.parametrize("mode", ["value", "mask"])
def test_nodata_region(tmp_path: Path, region: str, mode: str) -> None:
    res = _write(tmp_path, nodata=region, nodata_mode=mode, objects=8)
    spec = TestImageSpec(height=H, width=W, nodata=region, nodata_mode=mode, objects=8)
    region_px = nodata_mask(spec)
    assert 0.05 < region_px.mean() < 0.5
    with rasterio.open(res.path) as src:
        arr = src.read()
        mask = src.dataset_mask()
        if mode == "value":
            assert src.nodata == 0
        else:
            assert src.nodata is None
            assert all(MaskFlags.per_dataset in flags for flags in src.mask_flag_enums)
    if mode == "mask":
        assert not list(tmp_path.glob("*.msk"))  # internal mask, no side-car
    assert (arr[:, region_px] == 0).all()
    assert (arr[:, ~region_px] > 0).all()
    assert (mask[region_px] == 0).all()
    assert (mask[~region_px] == 255).all()
    # Objects never touch the region: a gap of OBJECT_GAP_PX pixels around each is valid.
    g = OBJECT_GAP_PX
    for o in res.objects:
        assert not region_px[o.row_min - g : o.row_max + g, o.col_min - g : o.col_max + g].any()


def test_white_nodata_value_keeps_valid_pixels_off_it(tmp_path: Path) -> None:
    res = _write(tmp_path, nodata="border", nodata_value=255, objects=8, seed=3)
    region_px = nodata_mask(TestImageSpec(height=H, width=W, nodata="border"))
    with rasterio.open(res.path) as src:
        assert src.nodata == 255
        arr, mask = src.read(), src.dataset_mask()
    assert (arr[:, region_px] == 255).all()  # a white nodata region
    assert (arr[:, ~region_px] < 255).all()  # object pixels at 255 moved to 254
    assert (mask[region_px] == 0).all() and (mask[~region_px] == 255).all()
    for o in res.objects:  # still bright: >= OBJECT_VALUE_MIN in every band
        assert arr[:, o.row_min : o.row_max, o.col_min : o.col_max].min() >= OBJECT_VALUE_MIN
    # The same picture as with the default nodata value 0, but for 255s moved to 254.
    plain = _read(_write(tmp_path, "zero.tif", nodata="border", objects=8, seed=3).path)
    np.testing.assert_array_equal(np.minimum(plain, 254)[:, ~region_px], arr[:, ~region_px])


@pytest.mark.parametrize(("mode", "bands"), [("mask", 3), ("alpha", 3), ("alpha", 1)])
@pytest.mark.parametrize("region", ["border", "rect"])
def test_hidden_objects_lie_under_the_mask(
    tmp_path: Path, mode: str, bands: int, region: str
) -> None:
    kw = {"nodata": region, "nodata_mode": mode, "bands": bands, "objects": 6}
    res = _write(tmp_path, hidden_objects=2, **kw)
    assert len(res.hidden) == 2 and [o.id for o in res.hidden] == [6, 7]
    assert res.objects == _write(tmp_path, "plain.tif", **kw).objects  # visible ones unchanged
    assert len(read_truth(res.truth_path)) == 6  # hidden ones are not in the truth
    with rasterio.open(res.path) as src:
        assert src.count == bands + (mode == "alpha")
        if mode == "alpha":
            assert src.colorinterp[-1] == ColorInterp.alpha and src.nodata is None
        arr, mask = src.read(list(range(1, bands + 1))), src.dataset_mask()
    region_px = nodata_mask(TestImageSpec(height=H, width=W, nodata=region))
    assert (mask[region_px] == 0).all() and (mask[~region_px] == 255).all()
    for o in res.hidden:
        g = OBJECT_GAP_PX
        assert region_px[o.row_min - g : o.row_max + g, o.col_min - g : o.col_max + g].all()
        assert arr[:, o.row_min : o.row_max, o.col_min : o.col_max].min() >= OBJECT_VALUE_MIN


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"hidden_objects": 1, "nodata": "rect"}, "nodata_mode=mask|alpha"),
        ({"hidden_objects": 1, "nodata_mode": "mask"}, "nodata=border|rect"),
        ({"nodata_value": 255, "nodata_mode": "mask"}, "unset unless nodata_mode=value"),
        ({"nodata_value": 1.5}, "an integer in 0..255"),
        ({"nodata_mode": "alpha", "bands": 4}, "1 or 3 with nodata_mode=alpha"),
        ({"hidden_objects": 400, "nodata": "border", "nodata_mode": "mask"}, "do not fit"),
    ],
)
def test_nodata_options_are_checked(tmp_path: Path, kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("|", r"\|")) as info:
        _write(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_degree_crs_needs_degree_origin_and_the_file_a_tif_name(tmp_path: Path) -> None:
    """crs=EPSG:4326 with the metre defaults put the raster at longitude 500,000; a .png name
    held a GeoTIFF. Both are refused in one line, and nothing is written."""
    with pytest.raises(ConfigError, match=r"in degrees.*longitudes 500000\.\.500205") as info:
        _write(tmp_path, "geo.tif", crs="EPSG:4326", width=2048, height=64)
    assert "\n" not in str(info.value) and not (tmp_path / "geo.tif").exists()
    ok = _write(tmp_path, "geo.tif", crs="EPSG:4326", origin_x=10, origin_y=50, pixel_size=1e-6)
    with rasterio.open(ok.path) as src:
        assert src.crs.to_epsg() == 4326 and src.bounds.left == pytest.approx(10)
    with pytest.raises(ConfigError, match=r"does not end in \.tif or \.tiff.*image_path=.*a\.tif"):
        parse_overrides([f"image_path={tmp_path / 'a.png'}"])


# ------------------------------------------------------------------ planted objects


def test_objects_match_pixels_and_truth(tmp_path: Path) -> None:
    res = _write(tmp_path, objects=25)
    arr = _read(res.path)
    assert len(res.objects) == 25
    assert [o.id for o in res.objects] == list(range(25))
    bright = (arr >= 230).all(axis=0)
    expected = np.zeros_like(bright)
    for o in res.objects:
        box = arr[:, o.row_min : o.row_max, o.col_min : o.col_max]
        assert (box >= 240).all()
        assert 12 <= o.height <= 40 and 12 <= o.width <= 40
        ring = np.zeros((H, W), dtype=bool)
        ring[max(o.row_min - 2, 0) : o.row_max + 2, max(o.col_min - 2, 0) : o.col_max + 2] = True
        ring[o.row_min : o.row_max, o.col_min : o.col_max] = False
        assert (arr[:, ring] < 230).all()
        expected[o.row_min : o.row_max, o.col_min : o.col_max] = True
    # A detector thresholding all bands >= 230 finds exactly the planted objects.
    np.testing.assert_array_equal(bright, expected)
    # Truth GeoPackage: same objects, polygons in map coordinates of the pixel corners.
    assert res.truth_path == tmp_path / "img_truth.gpkg"
    assert read_truth(res.truth_path) == list(res.objects)
    meta, _, geoms, fields = pyogrio.raw.read(res.truth_path, layer="objects")
    assert list(meta["fields"]) == ["id", "row_min", "col_min", "row_max", "col_max", "on_seam"]
    assert pyogrio.read_info(res.truth_path, layer="objects")["crs"] == "EPSG:32633"
    with rasterio.open(res.path) as src:
        t = src.transform
    for o, wkb in zip(res.objects, geoms, strict=True):
        x0, y0 = rasterio.transform.xy(t, o.row_min, o.col_min, offset="ul")
        x1, y1 = rasterio.transform.xy(t, o.row_max, o.col_max, offset="ul")
        poly = shapely.from_wkb(wkb)
        assert poly.bounds == pytest.approx((x0, y1, x1, y0), abs=1e-6)
        assert poly.area == pytest.approx(o.height * o.width * 0.01)


def _assert_layout(spec: TestImageSpec, objs: tuple[PlantedObject, ...]) -> None:
    """Placement invariants: inside, gaps, seam share and straddling, whole inside a tile."""
    assert len(objs) == spec.objects
    s = spec.stride
    seams_r, seams_c = seam_positions(spec.height, spec), seam_positions(spec.width, spec)
    for o in objs:
        assert OBJECT_GAP_PX <= o.row_min and o.row_max <= spec.height - OBJECT_GAP_PX
        assert OBJECT_GAP_PX <= o.col_min and o.col_max <= spec.width - OBJECT_GAP_PX
        assert spec.object_min_px <= min(o.height, o.width)
        assert max(o.height, o.width) <= spec.object_max_effective_px
        if o.on_seam:
            assert max(o.height, o.width) <= spec.overlap
        straddles = any(o.row_min < k < o.row_max for k in seams_r) or any(
            o.col_min < k < o.col_max for k in seams_c
        )
        assert straddles == o.on_seam
        # Whole inside at least one tile (r, c) starting at (r * s, c * s), tile_size square.
        r = max((o.row_max - spec.tile_size + s - 1) // s, 0)
        c = max((o.col_max - spec.tile_size + s - 1) // s, 0)
        assert r * s <= o.row_min and c * s <= o.col_min
    n_seam = sum(o.on_seam for o in objs)
    assert n_seam == math.floor(spec.objects * spec.seam_share + 0.5)
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            apart_r = (
                a.row_max + OBJECT_GAP_PX <= b.row_min or b.row_max + OBJECT_GAP_PX <= a.row_min
            )
            apart_c = (
                a.col_max + OBJECT_GAP_PX <= b.col_min or b.col_max + OBJECT_GAP_PX <= a.col_min
            )
            assert apart_r or apart_c


def test_seam_objects_straddle_seams(tmp_path: Path) -> None:
    spec = TestImageSpec(height=H, width=W, objects=20, seam_share=0.5)
    res = write_test_image(tmp_path / "seam.tif", spec)
    _assert_layout(spec, res.objects)
    assert sum(o.on_seam for o in res.objects) == 10


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(300, 1500),
    n=st.integers(0, 12),
    share=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    tile=st.sampled_from([(256, 64), (128, 32), (512, 128)]),
    seed=st.integers(0, 2**32),
)
def test_placement_properties(
    size: int, n: int, share: float, tile: tuple[int, int], seed: int
) -> None:
    spec = TestImageSpec(
        height=size,
        width=size + 37,
        objects=n,
        seam_share=share,
        tile_size=tile[0],
        overlap=tile[1],
        object_min_px=8,
        object_max_px=60,
        seed=seed,
    )
    no_seam = not (len(seam_positions(spec.height, spec)) or len(seam_positions(spec.width, spec)))
    if no_seam and math.floor(n * share + 0.5) > 0:
        with pytest.raises(ConfigError, match="seam_share"):
            place_objects(spec)
        return
    objs = place_objects(spec)
    _assert_layout(spec, objs)
    assert place_objects(spec) == objs  # deterministic


def test_object_max_clipped_to_overlap(caplog: pytest.LogCaptureFixture) -> None:
    spec = TestImageSpec(height=800, width=800, objects=10, object_max_px=60, overlap=20)
    with caplog.at_level(logging.WARNING, logger="mgpr.testimage"):
        objs = place_objects(spec)
    assert max(max(o.height, o.width) for o in objs) <= 20
    assert "overlap=20" in caplog.text


def test_no_seam_objects_need_no_overlap() -> None:
    spec = TestImageSpec(height=600, width=600, objects=6, seam_share=0.0, overlap=0)
    objs = place_objects(spec)
    _assert_layout(spec, objs)
    assert not any(o.on_seam for o in objs)


def test_too_many_objects_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="objects=500"):
        place_objects(TestImageSpec(height=200, width=200, objects=500, seam_share=0.0))


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("width", 0),
        ("height", -3),
        ("bands", 5),
        ("bands", 0),
        ("crs", "EPSG:99999"),
        ("pixel_size", 0.0),
        ("pixel_size", float("nan")),
        ("block_size", 500),
        ("compress", "jpeg"),
        ("nodata", "edge"),
        ("nodata_mode", "bitmask"),
        ("nodata_value", 256),
        ("hidden_objects", -1),
        ("objects", -1),
        ("seam_share", 1.5),
        ("overlap", 256),
        ("seed", -1),
        ("overviews", "yes"),
        ("object_max_px", 5),
    ],
)
def test_bad_spec_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        TestImageSpec(**{key: value})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_overlap_below_object_min_is_refused() -> None:
    with pytest.raises(ConfigError, match="overlap=8"):
        TestImageSpec(objects=1, overlap=8)


def test_unwritable_output_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="image_path"):
        write_test_image(blocker / "x.tif", TestImageSpec(width=64, height=64))


def test_read_truth_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope_truth.gpkg"):
        read_truth(tmp_path / "nope_truth.gpkg")


def test_library_imports_no_cli_or_torch() -> None:
    code = (
        "import sys, mgpr.testimage; "
        "print([m for m in ('typer', 'torch', 'lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ CLI


def test_cli_legacy_keys(tmp_path: Path) -> None:
    out = tmp_path / "t.tif"
    result = CliRunner().invoke(app, ["image_size=256", f"image_path={out}", "objects=3"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert "\n" not in line
    assert str(out) in line and "256x256x3" in line and "compression ratio" in line
    assert "3 objects" in line and str(tmp_path / "t_truth.gpkg") in line
    with rasterio.open(out) as src:
        assert src.shape == (256, 256)


def test_cli_output_alias_and_typed_values(tmp_path: Path) -> None:
    path, spec = parse_overrides(
        [
            "output=" + str(tmp_path / "o.tif"),
            "width=300",
            "height=200",
            "crs=none",
            "overviews=true",
            "pixel_size=0.5",
            "compress=ZSTD",
            "++seed=7",
        ]
    )
    assert path == tmp_path / "o.tif"
    assert (spec.width, spec.height, spec.crs, spec.overviews, spec.pixel_size, spec.seed) == (
        300,
        200,
        None,
        True,
        0.5,
        7,
    )
    assert spec.compress == "zstd"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["imag_size=256"], ["'imag_size'", "'image_size'"]),
        (["bandz=3"], ["'bandz'", "'bands'"]),
        (["image_size=big"], ["image_size", "'big'", "integer"]),
        (["overviews=maybe"], ["overviews", "'maybe'", "true or false"]),
        (["bands=9"], ["bands=9", "1..4"]),
        (["image_size=64", "width=64"], ["image_size", "width"]),
        (["image_size"], ["key=value"]),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], words: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, f"image_path={tmp_path / 'x.tif'}"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.tif").exists()


def test_cli_help_lists_keys_with_defaults() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in ("image_size", "image_path", "test_image.tif", "tile_size", "(256)", "EPSG:32633"):
        assert text in result.stdout


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize(
    ("dtype", "value_range", "nodata_value"),
    [("uint16", (0.0, 10000.0), 0.0), ("int16", (-1000.0, 10000.0), -32768.0)],
)
def test_integer_dtypes_stretch_the_8bit_picture_with_the_same_objects(
    tmp_path: Path, dtype: str, value_range: tuple[float, float], nodata_value: float
) -> None:
    spec = {"objects": 8, "nodata": "border", "bands": 4, "seed": 5}
    base = _write(tmp_path, "u8.tif", **spec)
    wide = _write(tmp_path, f"{dtype}.tif", dtype=dtype, **spec)
    assert wide.objects == base.objects  # same truth, whatever the dtype
    assert read_truth(wide.truth_path) == read_truth(base.truth_path)
    assert wide.raw_bytes == 2 * base.raw_bytes
    u8, arr = _read(base.path), _read(wide.path)
    lo, hi = value_range
    with rasterio.open(wide.path) as src:
        assert src.dtypes[0] == dtype and src.nodata == nodata_value
    valid = u8[0] != 0
    want = np.rint(lo + u8.astype(np.float64) * ((hi - lo) / 255))
    np.testing.assert_array_equal(arr[:, valid], want[:, valid])
    assert (arr[:, ~valid] == nodata_value).all() and (~valid).any()


def test_float32_dtype_with_nan_nodata_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "refl.tif"
    args = ["image_size=300", f"image_path={out}", "objects=3", "dtype=float32", "nodata=rect"]
    result = CliRunner().invoke(app, [*args, "value_range=[0,0.5]"])
    assert result.exit_code == 0, result.output
    assert "300x300x3 float32" in result.output
    with rasterio.open(out) as src:
        arr = src.read()
        assert np.isnan(src.nodata)
    finite = arr[np.isfinite(arr)]
    assert np.isnan(arr).any() and 0.0 < finite.min() and finite.max() <= 0.5 + 1e-6
    bad = CliRunner().invoke(app, [f"image_path={out}", "dtype=uint16", "value_range=[0,100]"])
    assert bad.exit_code == EXIT_USAGE and "at least 255 apart" in bad.output


def test_dtype_and_value_range_are_validated() -> None:
    with pytest.raises(ConfigError, match="dtype='uint12' is invalid: expected one of uint8"):
        TestImageSpec(dtype="uint12")
    with pytest.raises(ConfigError, match="value_range=.* at least 255 apart"):
        TestImageSpec(dtype="uint16", value_range=(0, 100))
    with pytest.raises(ConfigError, match="value_range=.*lo < hi"):
        TestImageSpec(dtype="float32", value_range=(1.0, 0.0))
    with pytest.raises(ConfigError, match="not a \\[lo,hi\\] pair"):
        parse_overrides(["value_range=5"])
    _, spec = parse_overrides(["dtype=uint16", "value_range=[100,4000]"])
    assert spec.value_range == (100.0, 4000.0) and spec.effective_value_range == (100.0, 4000.0)


def test_cli_counts_the_alpha_band(tmp_path: Path) -> None:
    out = tmp_path / "rgba.tif"
    args = ["image_size=128", f"image_path={out}", "objects=1", "nodata_mode=alpha", "seam_share=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "128x128x4 (3 + alpha) uint8" in result.output
    with rasterio.open(out) as src:
        assert src.count == 4
