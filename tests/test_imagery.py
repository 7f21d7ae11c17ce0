"""Native dtypes and ``value_range``: carriers, device scaling, and the ``mgpr`` command on real
uint16 / int16 / float32 GeoTIFFs from the generator (CPU, one rank, in process)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import read_gpkg_layer, run_mgpr_inprocess

from mgpr.conf.load import load_config
from mgpr.data.dataset import TileDataset
from mgpr.data.scaling import ValueScaler, _widen_unsigned
from mgpr.errors import ConfigError, InputError
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.geo.values import ValueRange, carrier_dtype, resolve_value_range
from mgpr.run.finish import demo_check
from mgpr.run.trainer import make_dataloader

#: The generator's seam grid; the runs below use the same tiles, so seam objects are tested.
GRID = ("tile_size=256", "overlap=64")


def _image(make_image, name: str, **spec: object):
    return make_image(
        name, width=700, height=600, objects=12, nodata="border", tile_size=256, overlap=64, **spec
    )


def _run(img, run: Path, *keys: str) -> int:
    return run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference", *GRID, "workers=0", f"output_dir={run}", *keys
    )


def _every_object_once(run: Path, img) -> dict:
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["planted"] == len(img.objects) == 12
    assert check["found"] == 12 and check["duplicates"] == 0, check
    assert check["unmatched_detections"] == 0 and check["max_footprint_error_px"] == 0.0, check
    return check


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------- carriers and scaling


def test_carrier_holds_every_dtype_exactly() -> None:
    def carrier(*dtypes: str) -> str:
        return carrier_dtype((f"r{i}.tif", d) for i, d in enumerate(dtypes)).name

    assert carrier("uint8") == "uint8" and carrier("uint16") == "uint16"
    assert carrier("int16") == "int16" and carrier("uint32") == "int64"
    assert carrier("float64") == "float32" and carrier("uint8", "uint16") == "uint16"
    assert carrier("uint16", "int16") == "int32" and carrier("uint8", "float32") == "float32"
    with pytest.raises(InputError, match="dtype complex64, which mgpr does not read"):
        carrier("uint8", "complex64")


def test_uint8_default_scaling_is_todays_divide_by_255_to_the_bit() -> None:
    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    got = ValueScaler()(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, x.to(torch.float32).div_(255.0))
    same = ValueRange((0.0,) * 3, (255.0,) * 3, "default", (1.0,) * 3, (0.0,) * 3)
    assert torch.equal(ValueScaler({"a.tif": same})(x), got)


def test_scaling_per_band_clips_and_zeroes_nan() -> None:
    vr = ValueRange((0.0, 1000.0), (10000.0, 3000.0), "value_range", (1.0, 1.0), (0.0, 0.0))
    x = torch.tensor([[[[0, 5000, 20000]], [[500, 2000, 3000]]]], dtype=torch.int32)
    got = ValueScaler({"a.tif": vr})(x)
    torch.testing.assert_close(got, torch.tensor([[[[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]]]]))
    f = torch.tensor([[[[float("nan"), 0.25, float("inf")]]]])
    one = ValueRange((0.0,), (0.5,), "value_range", (1.0,), (0.0,))
    out = ValueScaler({"f.tif": one})(f)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.5, 1.0]]]]))
    assert not torch.isnan(f[0, 0, 0, 1])  # the batch itself is not changed in place
    raw = ValueScaler(raw=True)(torch.tensor([[[[40000]]]], dtype=torch.uint16))
    assert raw.dtype == torch.float32 and float(raw) == 40000.0


def test_rasters_with_their_own_ranges_and_kept_tiles() -> None:
    a = ValueRange((0.0,), (100.0,), "value_range", (1.0,), (0.0,))
    b = ValueRange((0.0,), (1000.0,), "value_range", (1.0,), (0.0,))
    scaler = ValueScaler({"a.tif": a, "b.tif": b})
    assert scaler.needs_paths
    x = torch.full((3, 1, 2, 2), 50, dtype=torch.uint16)
    got = scaler(x, ["b.tif", "a.tif"], keep=torch.tensor([0, 2]))
    assert got.shape == (2, 1, 2, 2)
    assert float(got[0, 0, 0, 0]) == pytest.approx(0.05) and float(got[1, 0, 0, 0]) == 0.5


def test_unsigned_widening_fallback_is_exact() -> None:
    x = torch.tensor([0, 1, 32767, 32768, 65535], dtype=torch.int32).to(torch.uint16)
    assert _widen_unsigned(x).tolist() == [0, 1, 32767, 32768, 65535]
    y = torch.tensor([0, 2**31, 2**32 - 1], dtype=torch.int64).to(torch.uint32)
    assert _widen_unsigned(y).tolist() == [0, 2**31, 2**32 - 1]


def test_gdal_scale_offset_applies_before_the_range(tmp_path: Path) -> None:
    path = tmp_path / "scaled.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint16", crs="EPSG:32633",
        transform=rasterio.transform.from_origin(0, 80, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((1, 8, 8), 4000, np.uint16))
        dst.scales, dst.offsets = (0.0001,), (-0.1,)  # reflectance = raw * 1e-4 - 0.1
    info = describe_raster(str(path))
    vr = resolve_value_range(info, [1], [[0.0, 0.6]])
    # raw 4000 -> reflectance 0.3 -> half of [0, 0.6]
    x = torch.full((1, 1, 2, 2), 4000, dtype=torch.uint16)
    assert float(ValueScaler({str(path): vr})(x)[0, 0, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="is constant in its 2nd-98th percentiles"):
        resolve_value_range(info, [1], "auto")  # a constant band: refused, never divided by 0


def test_reader_and_pool_carry_uint16_exactly(make_image) -> None:
    img = make_image("u16.tif", width=300, height=200, bands=4, dtype="uint16")
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 0)
    reader = TileReader({info.path: [1, 2, 3, 4]}, 128, carrier="uint16")
    dataset = TileDataset(tiles, reader, set())
    assert dataset.sample_bytes() == 4 * 128 * 128 * 2
    with rasterio.open(img.path) as src:
        full = src.read()
    loader = make_dataloader(dataset, batch_size=2, workers=1, pin_memory=False)
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.uint16
        for image, index in zip(batch["image"], np.asarray(batch["index"]), strict=True):
            t = tiles[int(index)]
            want = full[:, t.row_off : t.row_off + t.valid_height, t.col_off :][
                :, :, : t.valid_width
            ]
            got = image.numpy()[:, : t.valid_height, : t.valid_width]
            np.testing.assert_array_equal(got, want)
            seen += 1
    assert seen == len(tiles) and int(full.max()) > 255  # values no uint8 could hold


# ---------------------------------------------------------------- value_range config


@pytest.mark.parametrize(
    ("value", "needle", "fix"),
    [
        ("[3000,0]", "lo=3000 must be below hi=0", "value_range=auto"),
        ("[0]", "[0] is not a [lo,hi] pair", "value_range=auto"),
        ("[[0,1],[2]]", "[2] is not a [lo,hi] pair", "value_range=auto"),
        ("bright", "value_range='bright' is not a range", "value_range=auto"),
        ("5", "value_range=5 is not a range", "value_range=auto"),
        # keyed by dtype
        ("{uint9:auto}", "names dtype 'uint9', which is not a raster dtype mgpr reads", "uint16"),
        ("{uint16:[3,1]}", "lo=3 must be below hi=1", "value_range=auto"),
        ("{uint16:bright}", "value_range={uint16:bright} is not a range", "value_range=auto"),
        ("{uint16:null}", "uint16's value None is not a range", "value_range=auto"),
        ("{}", "value_range={} names no dtype", "value_range=auto"),
    ],
)
def test_malformed_value_range_is_one_line(value: str, needle: str, fix: str, capsys) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config([f"value_range={value}"])
    assert run_mgpr_inprocess(f"value_range={value}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fix in err and needle in err, err


def test_value_range_forms_are_normalised() -> None:
    assert load_config(["value_range=[0,3000]"]).value_range == [[0.0, 3000.0]]
    assert load_config(["value_range=AUTO"]).value_range == "auto"
    assert load_config(["value_range=[[0,1],[2,3]]"]).value_range == [[0.0, 1.0], [2.0, 3.0]]
    assert load_config([]).value_range is None


# ---------------------------------------------------------------- end to end


def test_uint16_four_bands_scaled_by_value_range_finds_every_object(
    make_image, tmp_path: Path, capsys
) -> None:
    img = _image(make_image, "s2.tif", bands=4, dtype="uint16", value_range=(0, 10000))
    run = tmp_path / "run"
    assert _run(img, run, "value_range=[0,10000]") == 0
    _every_object_once(run, img)
    s = _summary(run)
    assert s["values"]["value_range"] == [[0.0, 10000.0]]
    assert s["values"]["inputs"][str(img.path)]["range"] == [[0.0, 10000.0]] * 4
    assert s["provenance"]["inputs"][0]["dtype"] == "uint16"
    stored = json.loads((run / "run.json").read_text())["fingerprint"]
    assert stored["value_range"] == [[0.0, 10000.0]]
    # A resume with another range is another run: refused, naming the key.
    capsys.readouterr()
    assert _run(img, run, "value_range=[0,12000]") == 2
    assert "value_range differs" in capsys.readouterr().err


def test_float32_with_nan_nodata_finds_every_object(make_image, tmp_path: Path) -> None:
    img = _image(make_image, "refl.tif", dtype="float32")
    with rasterio.open(img.path) as src:
        assert np.isnan(src.nodata) and np.isnan(src.read(1)[0, 0])
    run = tmp_path / "run"
    assert _run(img, run, "value_range=[0,1]") == 0
    _every_object_once(run, img)


def test_int16_per_band_value_range_is_applied_per_band(make_image, tmp_path: Path) -> None:
    img = _image(make_image, "dem.tif", bands=2, dtype="int16", value_range=(-1000, 10000))
    assert _run(img, tmp_path / "ok", "value_range=[[-1000,10000],[-1000,10000]]") == 0
    _every_object_once(tmp_path / "ok", img)
    # Band 2 stretched over 4x its real range: its objects are dark, so none is bright in all.
    assert _run(img, tmp_path / "wide", "value_range=[[-1000,10000],[-1000,43000]]") == 0
    geoms, _, _ = read_gpkg_layer(tmp_path / "wide" / "predictions.gpkg", "detections")
    assert len(geoms) == 0


def test_value_range_auto_on_uint16(make_image, tmp_path: Path, capsys) -> None:
    img = _image(make_image, "auto.tif", bands=3, dtype="uint16")
    run = tmp_path / "run"
    assert _run(img, run, "value_range=auto") == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == 12 and check["duplicates"] == 0
    ranges = _summary(run)["values"]["inputs"][str(img.path)]
    assert ranges["source"] == "auto" and len(ranges["range"]) == 3
    for lo, hi in ranges["range"]:  # 2nd-98th percentiles of backgrounds 8..200 of 0..10000
        assert 8 / 255 * 10000 - 1 <= lo < hi <= 10000
    printed = capsys.readouterr()
    assert "value_range (auto: 2nd-98th percentiles)" in printed.err
    assert "value_range=auto" in printed.out  # the summary's values line
    stored = json.loads((run / "run.json").read_text())["fingerprint"]
    assert stored["value_range"] == "auto" and stored["inputs"][0]["value_range"] == ranges["range"]


def test_uint16_without_value_range_is_refused_before_any_work(
    make_image, tmp_path: Path, capsys
) -> None:
    img = _image(make_image, "raw.tif", bands=4, dtype="uint16")
    run = tmp_path / "run"
    assert _run(img, run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [e for e in err if "error" in e.lower()]
    assert len(errors) == 1 and errors[0] == err[-1], err  # one line, the last one
    line = err[-1]
    assert "dtype uint16" in line and "value_range=[lo,hi]" in line and "value_range=auto" in line
    assert all(f"band {b}: " in line for b in (1, 2, 3, 4))
    assert not (run / "run.json").exists() and not (run / "predictions.gpkg").exists()
    assert not (run / "parts").exists() and not (run / "config.yaml").exists()
    assert [p.name for p in run.iterdir()] == ["logs"]  # nothing but the rank's log


def test_custom_model_asking_for_raw_values_gets_them(
    make_image, tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "mgpr_raw_model.py").write_text(
        textwrap.dedent(
            """
            import torch

            class MaxValue(torch.nn.Module):
                task = "classification"
                in_bands = 0
                input_range = "raw"

                def forward(self, x):
                    top = x.amax(dim=(1, 2, 3))
                    return torch.stack([top, torch.zeros_like(top)], dim=1)

            def build(weights):
                return MaxValue()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image("raw16.tif", width=300, height=200, bands=2, dtype="uint16")
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}", "model=mgpr_raw_model:build", "tile_size=128", "workers=0",
        f"output_dir={run}",
    )  # fmt: skip
    assert rc == 0
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    # softmax([max, 0]): ~1 for raw values in the thousands, <= 0.74 had they been in [0, 1]
    assert rows and all(r["class_id_1"] == 0 and r["score_1"] > 0.999 for r in rows)
    assert _summary(run)["values"]["value_range"] == "raw"


def test_reference_detector_bright_is_096_of_the_range_on_scaled_input() -> None:
    from mgpr.models import build_model

    adapter = build_model("reference")
    tile = torch.full((1, 3, 8, 8), 244, dtype=torch.uint8)  # 0.957 of the range: background
    tile[:, :, 0:2, 0:2] = 245  # 0.961 of the range in every band: bright
    for scaled in (ValueScaler()(tile), tile.to(torch.float32).mul_(1.0 / 255.0)):  # GPU-style
        with torch.inference_mode():
            (det,) = adapter.postprocess(adapter.forward(adapter.prepare(scaled)), 8)
        np.testing.assert_array_equal(det.boxes, [[0, 0, 2, 2]])


# ---------------------------------------------------------------- value_range per dtype


def test_value_range_by_dtype_is_normalised() -> None:
    cfg = load_config(["value_range={uint16:[0,4095],FLOAT32:auto}"])
    assert cfg.value_range == {"float32": "auto", "uint16": [[0.0, 4095.0]]}
    assert list(cfg.value_range) == ["float32", "uint16"]  # one spelling for run.json
    assert load_config(["value_range={int16:[[0,1],[2,3]]}"]).value_range == {
        "int16": [[0.0, 1.0], [2.0, 3.0]]
    }


def test_value_range_dtypes_are_the_dtypes_mgpr_reads() -> None:
    from mgpr.conf.load import VALUE_RANGE_DTYPES
    from mgpr.geo.values import CARRIERS

    assert set(VALUE_RANGE_DTYPES) == set(CARRIERS)


def _one_band(path: Path, dtype: str, scale: float = 1.0) -> object:
    with rasterio.open(
        path, "w", driver="GTiff", width=8, height=8, count=1, dtype=dtype, crs="EPSG:32633",
        transform=rasterio.transform.from_origin(0, 80, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((1, 8, 8), 7, dtype))
        dst.scales = (scale,)
    return describe_raster(str(path))


def test_a_range_the_rasters_integer_dtype_mostly_cannot_reach_is_refused(tmp_path: Path) -> None:
    """Data-free: uint8 holds 0..255, so a 12-bit range maps it onto 6 % of the model's input;
    a uint16 band with GDAL scale 1e-4 holds reflectance 0..6.55, so a range in raw counts is
    refused too. Ranges that the dtype covers at least half of pass, floats are not checked."""
    u8 = _one_band(tmp_path / "u8.tif", "uint8")
    with pytest.raises(ConfigError) as refused:
        resolve_value_range(u8, [1], [[0.0, 4095.0]], run_dtypes=["uint8", "uint16"])
    line = str(refused.value)
    assert "value_range [0, 4095] for band 1 of" in line and "(uint8: values 0..255)" in line
    assert "lies 94% beyond" in line
    assert "'value_range={uint16:[0,4095]}' (uint8, not named, keeps [0, 255])" in line
    assert resolve_value_range(u8, [1], [[0.0, 300.0]]).hi == (300.0,)
    refl = _one_band(tmp_path / "refl.tif", "uint16", scale=1e-4)
    with pytest.raises(ConfigError) as raw_counts:
        resolve_value_range(refl, [1], [[1000.0, 10000.0]], run_dtypes=["uint16"])
    line = str(raw_counts.value)  # the fix is physical units, not another per-dtype range
    assert "(uint16: values 0..6.5535 through its GDAL scale 0.0001 and offset 0) lies 100%" in line
    assert "for raw counts [1000, 10000] give value_range=[0.1,1], or value_range=auto" in line
    assert "value_range={" not in line
    assert resolve_value_range(refl, [1], [[0.1, 1.0]]).hi == (1.0,)
    assert resolve_value_range(refl, [1], [[0.0, 0.3]]).hi == (0.3,)
    f32 = _one_band(tmp_path / "f32.tif", "float32")
    assert resolve_value_range(f32, [1], [[0.0, 1e6]]).hi == (1e6,)


def test_refusals_name_what_fixes_them_first(tmp_path: Path, capsys) -> None:
    """An int64 raster is refused for its dtype before any value_range is asked for (a range
    would only lead to that refusal); an int16 raster that is nodata everywhere is not told to
    try value_range=auto, which needs valid pixels."""
    profile = dict(driver="GTiff", width=64, height=64, count=3, crs="EPSG:32633",
                   transform=rasterio.transform.from_origin(0, 640, 10, 10))  # fmt: skip
    wide, empty = tmp_path / "wide.tif", tmp_path / "empty.tif"
    with rasterio.open(wide, "w", dtype="int64", **profile) as dst:
        dst.write(np.ones((3, 64, 64), np.int64))
    with rasterio.open(empty, "w", dtype="int16", nodata=-9999, **profile) as dst:
        dst.write(np.full((3, 64, 64), -9999, np.int16))
    keys = ("model=reference", "tile_size=64", "workers=0", f"output_dir={tmp_path / 'run'}")
    assert run_mgpr_inprocess(f"input_path={wide}", *keys) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{str(wide)!r} has dtype int64, which mgpr does not read" in line, line
    assert run_mgpr_inprocess(f"input_path={empty}", *keys) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{str(empty)!r} has dtype int16 and no valid pixel in a decimated read" in line, line
    assert "auto" not in line and "set value_range=[lo,hi] to predict it anyway" in line


def test_a_folder_mixing_uint8_and_uint16_takes_a_range_per_dtype(
    make_image, tmp_path: Path, capsys
) -> None:
    """One range for both would have mapped the uint8 raster onto 6 % of the input (no object
    found, no word said); it is refused with the per-dtype form, which finds every object of
    both: the uint8 raster at its default [0, 255], the uint16 one at the range given."""
    folder = tmp_path / "orthos"
    folder.mkdir()
    a = _image(make_image, "orthos/a.tif")
    b = _image(make_image, "orthos/b.tif", dtype="uint16", value_range=(0, 4095), origin_x=6e5)
    run = tmp_path / "run"
    keys = ("model=reference", *GRID, "workers=0", f"output_dir={run}")
    assert run_mgpr_inprocess(f"input_path={folder}", *keys) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "these inputs mix dtypes (uint16, uint8)" in line, line
    assert run_mgpr_inprocess(f"input_path={folder}", *keys, "value_range=[0,4095]") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{str(a.path)!r} (uint8: values 0..255) lies 94% beyond" in line, line
    assert "'value_range={uint16:[0,4095]}'" in line
    assert not (run / "predictions.gpkg").exists()
    assert run_mgpr_inprocess(f"input_path={folder}", *keys, "value_range={float32:auto}") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{str(b.path)!r} has dtype uint16, which value_range (given for float32)" in line
    assert run_mgpr_inprocess(f"input_path={folder}", *keys, "value_range={uint16:[0,4095]}") == 0
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    found = {str(p): sum(r["source"] == str(p) for r in rows) for p in (a.path, b.path)}
    assert found == {str(a.path): 12, str(b.path): 12}, found
    values = _summary(run)["values"]
    assert values["value_range"] == {"uint16": [[0.0, 4095.0]]}
    a_values, b_values = values["inputs"][str(a.path)], values["inputs"][str(b.path)]
    assert (a_values["source"], a_values["range"]) == ("default", [[0.0, 255.0]] * 3)
    assert (b_values["source"], b_values["range"]) == ("value_range", [[0, 4095]] * 3)
    assert a_values["clipped"]["above"] == b_values["clipped"]["above"] == 0.0
    assert "value_range={uint16: [[0, 4095]]}" in capsys.readouterr().out
    assert run_mgpr_inprocess(f"input_path={folder}", *keys, "value_range={uint16:[0,4096]}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # a resume with another: refused
    assert "(value_range.uint16 differs: was [[0.0, 4095.0]], now [[0.0, 4096.0]])" in err


def test_bands_by_name_on_an_unscaled_raster_is_one_line(make_image, tmp_path: Path, capsys):
    img = _image(make_image, "raw.tif", dtype="uint16")
    for bands, needle in (("[red,green,blue]", "dtype uint16"), ("[nir]", "'nir' matches no")):
        assert _run(img, tmp_path / "run", f"bands={bands}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and not any("Traceback" in e for e in err), err


# ---------------------------------------------------------------- what the clamp moved


def test_clip_tally_counts_the_valid_values_outside_the_range() -> None:
    from mgpr.data.clipping import ClipTally, clipped_shares

    tally = ClipTally()
    assert tally.totals() is None  # nothing counted: no line, no key
    x = torch.tensor([[[[-0.5, 0.2], [1.5, 2.0]]], [[[0.0, 1.0], [-1.0, 3.0]]]])  # (2, 1, 2, 2)
    tally.add(x, None)
    totals = {"below": 2, "above": 3, "values": 8, "peak": None, "floor": -1.0, "inputs": {}}
    assert tally.totals() == totals  # the floor: the darkest value, before the clamp
    tally.add_peaks(x.clamp(0, 1) * 0.5, None)  # the peak: of the model's input as it goes in
    assert tally.totals()["peak"] == 0.5
    valid = torch.tensor([[[1, 1], [0, 0]], [[1, 1], [1, 0]]], dtype=torch.uint8)
    masked = ClipTally()
    masked.add(x, valid)  # masked pixels (nodata, padding) are not data: not counted
    totals = {"below": 2, "above": 0, "values": 5, "peak": None, "floor": -1.0, "inputs": {}}
    assert masked.totals() == totals
    dark = ClipTally()
    dark.add(x, torch.tensor([[[1, 1], [1, 1]], [[1, 1], [0, 0]]], dtype=torch.uint8))
    assert dark.totals()["floor"] == -0.5  # a masked -1.0 is no floor
    x3 = torch.full((1, 3, 2, 2), 2.0)
    fresh = ClipTally()
    fresh.add(x3, torch.tensor([[[1, 0], [0, 0]]]))  # every band of a valid pixel counts
    totals = {"below": 0, "above": 3, "values": 3, "peak": None, "floor": 2.0, "inputs": {}}
    assert fresh.totals() == totals
    # per input: tile 0 from b.tif, tile 1 from a.tif (runs of consecutive tiles of a raster)
    per = ClipTally()
    runs = [("b.tif", 0, 1), ("a.tif", 1, 2)]
    per.add(x, valid, runs)
    per.add_peaks(torch.stack([x[0].clamp(0, 1), x[1].clamp(0, 0.25)]), runs)
    per.add(x[:1], None, [("b.tif", 0, 1)])
    assert per.totals() == {
        "below": 3,
        "above": 2,
        "values": 5 + 4,
        "peak": 1.0,
        "floor": -1.0,
        "inputs": {"b.tif": [1 + 1, 0 + 2, 2 + 4, 1.0, -0.5], "a.tif": [1, 0, 3, 0.25, -1.0]},
    }
    shares = {"below": 1, "above": 3, "values": 4, "peak": 2.5, "floor": -0.5}
    assert clipped_shares(shares) == {**shares, "below": 0.25, "above": 0.75}


def test_summary_says_how_much_the_range_clipped(make_image, tmp_path: Path, capsys) -> None:
    """A 12-bit raster (nodata border, padded edge tiles in 256 px tiles) read with a uint8
    range: every valid value above hi, one warning; with its own range nothing clips (neither
    nodata nor padding is counted as below lo); auto clips about 2 % at each end."""
    img = _image(make_image, "b12.tif", dtype="uint16", value_range=(0, 4095))
    assert _run(img, tmp_path / "wrong", "value_range=[0,255]") == 0
    captured = capsys.readouterr()
    clipped = _summary(tmp_path / "wrong")["values"]["clipped"]
    assert clipped["above"] > 0.99 and clipped["below"] == 0.0 and clipped["values"] > 0
    warned = [line for line in captured.err.splitlines() if "value_range does not fit" in line]
    assert len(warned) == 1 and f"{str(img.path)!r} 100% above hi" in warned[0], warned
    assert "of 1 input(s)" in warned[0]
    assert _summary(tmp_path / "wrong")["values"]["inputs"][str(img.path)]["clipped"] == clipped
    assert f"clipped 0.0% below lo, {clipped['above']:.1%} above hi" in captured.out
    assert _run(img, tmp_path / "right", "value_range=[0,4095]") == 0
    right = _summary(tmp_path / "right")["values"]["clipped"]
    assert right["below"] == right["above"] == 0.0, right
    with rasterio.open(img.path) as src:  # every valid value of every band of every tile
        valid = src.dataset_mask() > 0
    tiles = plan_tiles(str(img.path), 600, 700, 256, 64)
    expected = sum(
        int(
            valid[
                t.row_off : t.row_off + t.valid_height, t.col_off : t.col_off + t.valid_width
            ].sum()
        )
        for t in tiles
    )
    assert right["values"] == 3 * expected == clipped["values"]
    assert "value_range does not fit" not in capsys.readouterr().err
    assert _run(img, tmp_path / "auto", "value_range=auto") == 0
    auto = _summary(tmp_path / "auto")["values"]["clipped"]
    assert 0.005 < auto["below"] < 0.04 and 0.0 <= auto["above"] < 0.04, auto
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["totals"]["values_clipped"]["values"] == auto["values"]


def test_uint8_by_its_default_range_records_no_clipping(make_image, tmp_path: Path) -> None:
    img = _image(make_image, "rgb.tif")
    assert _run(img, tmp_path / "run") == 0
    assert "clipped" not in _summary(tmp_path / "run")["values"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["totals"]["values_clipped"] is None


def test_one_input_of_a_folder_clipped_by_a_range_meant_for_the_others(
    make_image, tmp_path: Path, capsys
) -> None:
    """Two uint16 rasters, 12-bit and 16-bit, one range for 12 bits: the 16-bit one is named,
    with its own share in summary.json; the 12-bit one clips nothing."""
    (tmp_path / "orthos").mkdir()
    b12 = _image(make_image, "orthos/b12.tif", dtype="uint16", value_range=(0, 4095))
    b16 = _image(make_image, "orthos/b16.tif", dtype="uint16", value_range=(0, 65535), origin_x=6e5)
    run = tmp_path / "run"
    keys = ("model=reference", *GRID, "workers=0", f"output_dir={run}", "value_range=[0,4095]")
    assert run_mgpr_inprocess(f"input_path={tmp_path / 'orthos'}", *keys) == 0
    values = _summary(run)["values"]
    ok, wrong = (
        values["inputs"][str(b12.path)]["clipped"],
        values["inputs"][str(b16.path)]["clipped"],
    )
    assert ok["below"] == ok["above"] == 0.0 and wrong["above"] > 0.9, (ok, wrong)
    assert ok["values"] + wrong["values"] == values["clipped"]["values"]
    warned = [x for x in capsys.readouterr().err.splitlines() if "value_range does not fit" in x]
    assert len(warned) == 1 and "of 1 input(s)" in warned[0], warned
    assert repr(str(b16.path)) in warned[0] and repr(str(b12.path)) not in warned[0]


@pytest.mark.parametrize(
    ("spec", "given", "shown"),
    [
        ({"dtype": "uint16", "value_range": (0, 4095)}, "[0,65535]", "at most 6.2% of the way"),
        ({"dtype": "float32"}, "[0,10000]", "at most 0.01% of the way"),
    ],
    ids=["12-bit-under-16-bit-range", "reflectance-under-counts"],
)
def test_a_range_far_wider_than_the_data_is_warned_of(
    make_image, tmp_path: Path, capsys, spec: dict, given: str, shown: str
) -> None:
    """Nothing clips, but every value lands near 0: the model sees a nearly black raster."""
    img = _image(make_image, "dim.tif", **spec)
    assert _run(img, tmp_path / "run", f"value_range={given}") == 0
    clipped = _summary(tmp_path / "run")["values"]["inputs"][str(img.path)]["clipped"]
    assert clipped["below"] == clipped["above"] == 0.0 and clipped["peak"] < 0.07, clipped
    warned = [x for x in capsys.readouterr().err.splitlines() if "value_range does not fit" in x]
    assert len(warned) == 1 and f"{str(img.path)!r} {shown} to hi" in warned[0], warned
    assert "crushed into a narrow band" in warned[0]


@pytest.mark.parametrize(
    ("given", "band"),
    [("[-20,1]", (0.952, 1.0)), ("[-10,11]", (0.476, 0.524))],
    ids=["crushed-near-1", "crushed-mid-range"],
)
def test_a_range_far_off_on_the_low_side_is_warned_of(
    make_image, tmp_path: Path, capsys, given: str, band: tuple[float, float]
) -> None:
    """Reflectance 0..1 under a range whose lo lies far below it: nothing clips and the peak
    is high, but every value lands in a band under 5 % wide: one flat grey to the model. The
    floor leaves the nodata border out (0 under [-20, 1] would be the floor 0.952 too)."""
    img = _image(make_image, "flat.tif", dtype="float32")
    with rasterio.open(img.path) as src:
        data, mask = src.read(), src.dataset_mask()
    valid = data[:, mask > 0]
    lo, hi = (float(v) for v in given.strip("[]").split(","))
    floor, peak = (float(valid.min()) - lo) / (hi - lo), (float(valid.max()) - lo) / (hi - lo)
    assert band[0] - 0.01 < floor < peak < band[1] + 0.01  # the generator's values: 0..1
    assert _run(img, tmp_path / "run", f"value_range={given}") == 0
    clipped = _summary(tmp_path / "run")["values"]["inputs"][str(img.path)]["clipped"]
    assert clipped["floor"] == pytest.approx(floor, abs=1e-5), clipped
    assert clipped["peak"] == pytest.approx(peak, abs=1e-5), clipped
    assert clipped["below"] == clipped["above"] == 0.0, clipped
    warned = [x for x in capsys.readouterr().err.splitlines() if "value_range does not fit" in x]
    shown = f"{str(img.path)!r} only from {floor:.1%} to {min(peak, 1.0):.1%} of the way to hi"
    assert len(warned) == 1 and shown in warned[0], warned


def test_peak_is_taken_before_the_clamp_and_leaves_out_nodata(make_image, tmp_path: Path) -> None:
    """uint16 content stretched to [0, 10000] under value_range=[1000,5000]: the brightest
    valid value is (10000 - 1000) / 4000 = 2.25 of the range (the clamped input peaked at 1.0);
    the white nodata border (65535, i.e. 16.1 of the range) is no peak."""
    img = _image(make_image, "bright.tif", dtype="uint16", nodata_value=65535)
    with rasterio.open(img.path) as src:
        data, mask = src.read(), src.dataset_mask()
    top = float(data[:, mask > 0].max())
    assert int(data.max()) == 65535 and top <= 10000  # a nodata border, and valid content
    assert _run(img, tmp_path / "run", "value_range=[1000,5000]") == 0
    clipped = _summary(tmp_path / "run")["values"]["inputs"][str(img.path)]["clipped"]
    assert clipped["peak"] == pytest.approx((top - 1000) / 4000, abs=1e-4), clipped
    assert clipped["peak"] > 2.0 and clipped["above"] > 0
