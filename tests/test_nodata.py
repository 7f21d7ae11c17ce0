"""Nodata masked inside tiles (#14): the validity mask travels with each tile, masked pixels are
filled with 0 after scaling, and detections centred on masked pixels are dropped.

Real GeoTIFFs from the generator: a uint8 raster whose nodata value 255 makes its nodata region
white (the reference detector finds "bright" objects, so without the mask it would report the
region), internal-mask and RGBA rasters with objects planted wholly under the mask
(``hidden_objects``), float32 with NaN nodata (declared or not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from conftest import read_gpkg_layer, run_mgpr_inprocess, write_array

from mgpr.data.batch_pool import SharedBatchPool, parts_layout
from mgpr.data.dataset import STATUS_EMPTY, STATUS_OK, TileDataset
from mgpr.data.masking import fill_invalid
from mgpr.geo.bands import check_bands
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Classification, Detections, ModelAdapter
from mgpr.models.reference import ReferenceDetectorAdapter
from mgpr.run.finish import demo_check
from mgpr.run.module import InferenceModule
from mgpr.run.trainer import make_dataloader
from mgpr.tasks.nodata import drop_masked, drop_masked_detections

GRID = ("tile_size=256", "overlap=64")


def _run(path: Path, run: Path, *keys: str) -> int:
    return run_mgpr_inprocess(
        f"input_path={path}", "model=reference", *GRID, "workers=0", f"output_dir={run}", *keys
    )


def _every_object_once(run: Path, img) -> None:
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == check["planted"] == len(img.objects), check
    assert check["duplicates"] == 0 and check["unmatched_detections"] == 0, check


def _dataset(path: str, tile: int = 256, overlap: int = 64) -> TileDataset:
    info = describe_raster(path)
    tiles = plan_tiles(path, info.height, info.width, tile, overlap)
    reader = TileReader({path: check_bands(info, None, 0)}, tile, info.dtype)
    return TileDataset(tiles, reader, {path} if info.has_mask else set())


def _detect_unmasked(ds: TileDataset, lo: float = 0.0, hi: float = 255.0) -> int:
    """Boxes the reference detector finds when the mask is ignored (what mgpr did before)."""
    adapter = ReferenceDetectorAdapter()
    found = 0
    for i in range(len(ds)):
        image = ds.reader.read(ds.tiles[i]).astype(np.float32)
        x = torch.from_numpy(np.nan_to_num((image - lo) / (hi - lo)))[None].clamp_(0, 1)
        with torch.inference_mode():
            (det,) = adapter.postprocess(adapter.forward(x), ds.reader.tile_size)
        found += len(det)
    return found


# ---------------------------------------------------------------- whole runs (CLI, 1 rank)


def test_white_nodata_255_gives_no_detection_and_every_object_once(
    make_image, tmp_path: Path
) -> None:
    img = make_image(
        "white.tif", width=700, height=600, objects=12, nodata="border", nodata_value=255,
        tile_size=256, overlap=64,
    )  # fmt: skip
    # The border is white: read without its mask, the reference detector reports it.
    assert _detect_unmasked(_dataset(str(img.path))) > len(img.objects)
    run = tmp_path / "run"
    assert _run(img.path, run) == 0
    _every_object_once(run, img)


@pytest.mark.parametrize(("mode", "bands"), [("mask", 3), ("alpha", 3)])
def test_object_wholly_under_mask_or_alpha_is_not_reported(
    make_image, tmp_path: Path, mode: str, bands: int
) -> None:
    img = make_image(
        f"{mode}.tif", width=768, height=640, bands=bands, objects=8, hidden_objects=2,
        nodata="rect", nodata_mode=mode, tile_size=256, overlap=64,
    )  # fmt: skip
    assert len(img.hidden) == 2
    ds = _dataset(str(img.path))
    if mode == "alpha":  # alpha is a mask, never model input
        assert describe_raster(str(img.path)).count == 4 and ds.bands[str(img.path)] == 3
    # Read without the mask, the hidden objects are there to be found.
    assert _detect_unmasked(ds) >= len(img.objects) + len(img.hidden)
    run = tmp_path / "run"
    assert _run(img.path, run) == 0
    _every_object_once(run, img)
    geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    for obj in img.hidden:
        for r in rows:
            overlap_cols = min(r["px_xmax"], obj.col_max) - max(r["px_xmin"], obj.col_min)
            overlap_rows = min(r["px_ymax"], obj.row_max) - max(r["px_ymin"], obj.row_min)
            assert overlap_cols <= 0 or overlap_rows <= 0, (obj, r)


@pytest.mark.parametrize("declared", [True, False])
def test_float32_nan_is_invalid_declared_or_not(make_image, tmp_path: Path, declared: bool) -> None:
    img = make_image(
        "refl.tif", width=600, height=520, objects=8, nodata="border", dtype="float32",
        tile_size=256, overlap=64,
    )  # fmt: skip
    if not declared:
        with rasterio.open(img.path, "r+") as dst:
            dst.nodata = None
    info = describe_raster(str(img.path))
    assert info.has_mask == declared
    ds = _dataset(str(img.path))
    batch = ds.__getitems__(list(range(len(ds)))).batch
    images, masks = batch["image"].numpy(), batch["mask"].numpy()
    for pos, tile in enumerate(ds.tiles):
        vh, vw = tile.valid_height, tile.valid_width
        nan = np.isnan(images[pos, :, :vh, :vw]).any(axis=0)
        if batch["status"][pos] == STATUS_OK:
            np.testing.assert_array_equal(masks[pos, :vh, :vw] == 0, nan)
        assert (masks[pos, vh:, :] == 0).all() and (masks[pos, :, vw:] == 0).all()
    run = tmp_path / "run"
    assert _run(img.path, run, "value_range=[0,1]") == 0
    _every_object_once(run, img)


def test_float32_infinities_are_invalid_like_nan(tmp_path: Path) -> None:
    """+-inf (a ratio's division by zero) was scaled to 1 or 0 and shown to the model as a
    saturated patch: a bright square of +inf was "detected". Now invalid, as NaN is."""
    data = np.full((3, 256, 256), 0.1, dtype=np.float32)
    data[:, 40:80, 40:80] = np.inf  # a bright square, for a detector of bright squares
    data[1, 150:160, 150:160] = -np.inf  # one band is enough
    path = write_array(tmp_path / "ratio.tif", data)
    ds = _dataset(str(path), tile=256, overlap=0)
    batch = ds.__getitems__([0]).batch
    invalid = batch["mask"].numpy()[0] == 0
    expected = np.zeros((256, 256), dtype=bool)
    expected[40:80, 40:80] = expected[150:160, 150:160] = True
    np.testing.assert_array_equal(invalid, expected)
    run = tmp_path / "run"
    assert _run(str(path), run, "value_range=[0,1]") == 0
    _geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert rows == []  # the +inf square is no object


def test_float32_lowest_is_invalid_declared_or_not(tmp_path: Path) -> None:
    """-3.4028235e38 is ESRI's float nodata, often left undeclared: value_range=auto took it
    as its 2nd percentile and every real value reached the model as 1 (a white raster, 20
    false boxes). Now it is invalid like NaN: the same mask, range and boxes as declared."""
    from mgpr.geo.values import sample_values

    data = np.full((3, 256, 256), 0.1, dtype=np.float32)
    data[:, 100:140, 100:140] = 0.9  # one bright square
    data[:, :, :64] = -3.4028235e38  # an undeclared nodata collar
    data[0, 200:210, 200:210] = 3.4028235e38  # one band is enough
    path = write_array(tmp_path / "esri.tif", data)
    ds = _dataset(str(path), tile=256, overlap=0)
    invalid = ds.__getitems__([0]).batch["mask"].numpy()[0] == 0
    expected = np.zeros((256, 256), dtype=bool)
    expected[:, :64] = expected[200:210, 200:210] = True
    np.testing.assert_array_equal(invalid, expected)
    (band,) = sample_values(str(path), [1])
    assert band.min() == pytest.approx(0.1) and band.max() == pytest.approx(0.9)
    run = tmp_path / "run"
    assert _run(str(path), run, "value_range=auto") == 0
    _geoms, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    assert [(r["px_xmin"], r["px_ymin"], r["px_xmax"], r["px_ymax"]) for r in rows] == [
        (100, 100, 140, 140)
    ]


@pytest.mark.parametrize(
    "spec",
    [{"nodata": "border", "nodata_value": 255}, {"nodata": "rect", "nodata_mode": "mask"}],
    ids=["white-value", "mask-hidden"],
)
def test_nodata_masked_on_a_model_grid(make_image, tmp_path: Path, spec: dict) -> None:
    """gsd=0.1 on 5 cm imagery (factor 2): the mask is read onto the model grid as well."""
    hidden = 2 if spec["nodata"] == "rect" else 0
    img = make_image(
        "g.tif", width=896, height=768, pixel_size=0.05, objects=8, hidden_objects=hidden,
        object_min_px=24, object_max_px=56, tile_size=256, overlap=64, seed=2, **spec,
    )  # fmt: skip
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={img.path}", "model=reference", "tile_size=128", "overlap=32", "gsd=0.1",
        "workers=0", f"output_dir={run}",
    )  # fmt: skip
    assert code == 0
    check = demo_check(run / "predictions.gpkg", img.truth_path)
    assert check["found"] == 8 and check["duplicates"] == 0, check
    assert check["unmatched_detections"] == 0, check


def test_model_grid_mask_is_any_valid_native_pixel(tmp_path: Path) -> None:
    """Factor 2: a model pixel over one valid and one nodata native column is valid."""
    from mgpr.geo.gsd import on_model_grid

    path = tmp_path / "g.tif"
    data = np.full((1, 64, 256), 9, np.uint8)
    data[:, :, :131] = 0  # nodata left of native column 131: model column 65 is half valid
    with rasterio.open(
        path, "w", driver="GTiff", width=256, height=64, count=1, dtype="uint8", nodata=0,
        crs="EPSG:32633", transform=Affine(0.05, 0, 500000, 0, -0.05, 5000000),
    ) as dst:  # fmt: skip
        dst.write(data)
    info = on_model_grid(describe_raster(str(path)), 0.1, "auto")
    assert info.model_grid is not None and (info.width, info.height) == (128, 32)
    reader = TileReader({str(path): [1]}, 32, grids={str(path): info.model_grid})
    assert reader._nodata_of_read_bands(str(path)) is None  # resampled values: GDAL's mask
    image, mask = np.empty((1, 32, 32), np.uint8), np.empty((32, 32), np.uint8)
    got = []
    for tile in plan_tiles(str(path), info.height, info.width, 32, 0):
        got.append(reader.read_masked(tile, image, mask))
        if tile.col_off == 64:
            assert (mask[:, 0] == 0).all() and (mask[:, 1:] == 255).all()  # 65 = native 130-131
    assert got == [False, False, True, True]


# ---------------------------------------------------------------- the mask in the batch


def test_mask_travels_in_the_image_slot_through_workers(make_image) -> None:
    img = make_image("m.tif", width=512, height=448, nodata="rect", nodata_mode="mask")
    ds = _dataset(str(img.path), tile=128, overlap=0)
    with rasterio.open(img.path) as src:
        full = src.dataset_mask()
    loader = make_dataloader(ds, 2, 1, pin_memory=False)
    seen = empty = unmasked = 0
    for batch in loader:
        image, mask = batch["image"], batch["mask"]
        if mask is not None:
            assert mask.dtype == torch.uint8 and mask.shape == (len(image), 128, 128)
            assert mask.untyped_storage().data_ptr() == image.untyped_storage().data_ptr()
        unmasked += mask is None
        for pos, idx in enumerate(batch["index"].tolist()):
            tile = ds.tiles[idx]
            r, c, vh, vw = tile.row_off, tile.col_off, tile.valid_height, tile.valid_width
            want = np.zeros((128, 128), np.uint8)
            want[:vh, :vw] = full[r : r + vh, c : c + vw]
            if batch["status"][pos] == STATUS_EMPTY:
                assert not want.any()
                empty += 1
            if mask is None:  # every tile of the batch wholly valid: no mask to carry
                assert (want == 255).all() and batch["status"][pos] == STATUS_OK
            else:
                np.testing.assert_array_equal(mask[pos].numpy(), want)
            seen += 1
    assert seen == len(ds) and empty > 0 and 0 < unmasked < len(loader)
    pooled, _ = loader.batch_pool.reuse_counts()
    assert pooled > 0


@pytest.mark.parametrize(
    ("dtype", "nodata", "bands"),
    [("uint8", 0, [1, 2, 3]), ("uint16", 7, [3, 1, 2]), ("float32", float("nan"), [1, 2, 3]),
     ("float32", -9999.0, [1, 2, 3]), ("uint8", 0, [1, 2])],
)  # fmt: skip
def test_read_masked_matches_gdals_dataset_mask(
    tmp_path: Path, dtype: str, nodata: float, bands: list[int]
) -> None:
    """The mask derived from the values (all bands read) or read from GDAL (a subset) is GDAL's:
    valid where ANY band differs from nodata, so a pixel nodata in one band only is valid."""
    rng = np.random.default_rng(4)
    data = rng.integers(1, 4, (3, 150, 170)).astype(dtype)
    data[data == 3] = nodata  # about a third of each band; all three bands on ~4 % of pixels
    data[:, :40, :60] = nodata
    path = tmp_path / "nd.tif"
    profile = {"driver": "GTiff", "width": 170, "height": 150, "count": 3, "dtype": dtype,
               "crs": "EPSG:32633", "transform": Affine(1, 0, 500000, 0, -1, 5000000)}  # fmt: skip
    with rasterio.open(path, "w", nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
                       **profile) as dst:  # fmt: skip
        dst.write(data)
    with rasterio.open(path) as src:
        full = src.dataset_mask()
    assert 0 < (full == 0).mean() < 0.2
    reader = TileReader({str(path): bands}, 64, dtype)
    derived = reader._nodata_of_read_bands(str(path)) is not None
    assert derived == (len(bands) == 3)  # a subset of the bands: GDAL's own mask
    info = describe_raster(str(path))
    for tile in plan_tiles(str(path), info.height, info.width, 64, 0):
        image = np.empty((len(bands), 64, 64), dtype)
        mask = np.empty((64, 64), np.uint8)
        any_valid = reader.read_masked(tile, image, mask)
        r, c, vh, vw = tile.row_off, tile.col_off, tile.valid_height, tile.valid_width
        want = np.zeros((64, 64), np.uint8)
        want[:vh, :vw] = full[r : r + vh, c : c + vw]
        np.testing.assert_array_equal(mask, want, err_msg=str(tile))
        assert any_valid == bool(want.any())
        if any_valid:
            np.testing.assert_array_equal(image, reader.read(tile))


def test_no_mask_and_no_cost_for_rasters_without_invalid_pixels(make_image) -> None:
    img = make_image("plain.tif", width=300, height=300)
    ds = _dataset(str(img.path), tile=128, overlap=0)
    batch = ds.__getitems__([0, 1]).batch
    assert batch["mask"] is None
    assert ds.sample_bytes() == 3 * 128 * 128
    masked = _dataset(str(make_image("nd.tif", width=300, height=300, nodata="border").path), 128)
    assert masked.sample_bytes() == 3 * 128 * 128 + 128 * 128  # the /dev/shm check counts it


def test_pool_parts_share_one_slot_and_the_mask_keeps_it_in_use() -> None:
    parts = [((2, 3, 5, 5), torch.uint16), ((2, 5, 5), torch.uint8)]
    offsets, total = parts_layout(parts)
    assert offsets == [0, 320] and total == 320 + 50  # 300 image bytes, rounded up to 64
    pool = SharedBatchPool(workers=1, slots_per_worker=1)
    (image, mask), slot = pool.acquire_parts(0, parts)
    assert slot == 0 and image.shape == (2, 3, 5, 5) and mask.shape == (2, 5, 5)
    mask.fill_(255)
    image.fill_(7)
    assert int(mask.sum()) == 255 * 50 and int(image.sum()) == 7 * 150  # no overlap
    _, fresh = pool.acquire_parts(0, parts)
    assert fresh == -1  # the slot is taken until the main process frees it
    pool._buffers.clear()  # the worker's own reference: another process in a run
    pool.track({"image": image, "mask": mask, "pool_slot": slot})
    del image
    pool.release_expired()
    assert int(pool.in_use[0]) == 1  # the mask is a view of the slot: still in use
    del mask
    pool.release_expired()
    assert int(pool.in_use[0]) == 0


# ---------------------------------------------------------------- fill and drop


def test_fill_invalid_zeroes_every_band_of_masked_pixels_of_kept_tiles() -> None:
    x = torch.ones((2, 3, 4, 4))
    mask = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    mask[2, 0, 0] = 0  # tile 2 of the batch (the second kept one)
    mask[1, 1, 1] = 0  # tile 1: not kept
    out = fill_invalid(x, mask, torch.tensor([0, 2]))
    assert out is x and float(x[1, :, 0, 0].abs().sum()) == 0.0
    assert float(x.sum()) == 2 * 3 * 16 - 3
    assert fill_invalid(x, None) is x


def _dets(*boxes: tuple[float, float, float, float]) -> Detections:
    n = len(boxes)
    return Detections(
        np.asarray(boxes, np.float32).reshape(n, 4),
        np.arange(n, dtype=np.float32) / 10,
        np.arange(n, dtype=np.int64),
    )


def test_drop_masked_detections_by_box_centre_at_tile_edges() -> None:
    valid = np.full((8, 8), 255, np.uint8)
    valid[:, 6:] = 0  # the last two columns: e.g. past the raster's right edge
    valid[0, 0] = 0
    det = _dets(
        (0, 0, 1, 1),  # centre (0.5, 0.5): pixel (0, 0), invalid -> dropped
        (0, 0, 2, 2),  # centre (1, 1): pixel (1, 1) (half-open), valid -> kept
        (4, 2, 8, 4),  # centre col 6.0: pixel column 6, invalid -> dropped
        (3, 2, 8, 4),  # centre col 5.5: column 5, valid although the box reaches into nodata
        (7, 7, 8, 8),  # the tile's last pixel, invalid -> dropped
        (-4, -4, 0, 0),  # centre outside the tile, clipped to pixel (0, 0), invalid -> dropped
        (5, 7, 5, 9),  # centre (5, 8) past the bottom edge: clipped to row 7, column 5 -> kept
        (float("nan"), 0, 1, 1),  # no centre: kept, not this rule's business
    )
    kept = drop_masked_detections(det, valid)
    np.testing.assert_array_equal(kept.labels, [1, 3, 6, 7])
    np.testing.assert_array_equal(kept.scores, det.scores[[1, 3, 6, 7]])
    np.testing.assert_array_equal(kept.boxes[:2], det.boxes[[1, 3]])
    all_valid = np.ones((8, 8), bool)
    assert drop_masked_detections(det, all_valid) is det
    empty = Detections.empty()
    assert drop_masked_detections(empty, valid) is empty
    # In a batch: each result against its own tile's mask; other records untouched.
    masks = np.stack([np.zeros((8, 8), np.uint8), valid])
    cls = Classification(np.zeros(1, np.int64), np.ones(1, np.float32))
    got = drop_masked([_dets((0, 2, 2, 4)), cls], masks, [1, 0])
    assert len(got[0]) == 1 and got[1] is cls


class _FixedBoxes(ModelAdapter):
    """Reports the same two boxes in every tile and records what ``prepare`` received."""

    def __init__(self, input_range: str) -> None:
        super().__init__(
            name="fixed", task="detection", categories=None, in_bands=0,
            random_weights=False, weights_id="none", module=torch.nn.Identity(),
        )  # fmt: skip
        self.input_range = input_range  # type: ignore[assignment]
        self.seen: list[torch.Tensor] = []

    def prepare(self, images: torch.Tensor) -> Any:
        self.seen.append(images.clone())
        return images

    def postprocess(self, raw: Any, tile_size: int) -> list[Detections]:
        return [_dets((0, 0, 4, 4), (8, 8, 12, 12)) for _ in range(raw.shape[0])]


@pytest.mark.parametrize("input_range", ["unit", "raw"])
def test_predict_step_fills_masked_input_and_drops_masked_boxes(
    make_image, input_range: str
) -> None:
    img = make_image("p.tif", width=16, height=16, bands=1, dtype="float32")
    ds = _dataset(str(img.path), tile=16, overlap=0)
    adapter = _FixedBoxes(input_range)
    module = InferenceModule(adapter, ds.tiles * 2, 16)
    image = torch.full((2, 1, 16, 16), 0.5)
    image[:, :, :8, :8] = float("nan")  # nodata: the first box's centre (2, 2) lies there
    image[1, :, 8:, 8:] = 1.0
    mask = torch.full((2, 16, 16), 255, dtype=torch.uint8)
    mask[:, :8, :8] = 0
    mask[1, 8:, 8:] = 0  # tile 1: the second box's centre (10, 10) is masked too
    batch = {
        "image": image, "mask": mask, "index": np.array([0, 1]), "status": np.array([0, 0]),
        "reason": ["", ""],
    }  # fmt: skip
    with torch.inference_mode():
        out0, out1 = module.predict_step(
            module.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0
        )
    (x,) = adapter.seen
    assert float(x[:, :, :8, :8].abs().sum()) == 0.0  # filled with 0, no NaN, in both ranges
    assert float(x[1, :, 8:, 8:].abs().sum()) == 0.0 and float(x[0, 0, 9, 9]) > 0  # valid: kept
    np.testing.assert_array_equal(out0.record.boxes, [[8, 8, 12, 12]])
    assert isinstance(out1.record, Detections) and len(out1.record) == 0


def test_an_input_that_is_all_nodata_is_named_and_the_hint_says_so(
    make_image, tmp_path: Path, capsys
) -> None:
    """A wrong nodata value (every pixel declared invalid) is a warning, not a bottleneck."""
    import json

    good = make_image("in/good.tif", width=256, height=256, objects=2, seed=1)
    blank = tmp_path / "in" / "blank.tif"
    with rasterio.open(good.path) as src:
        profile = src.profile | {"nodata": 0}
    with rasterio.open(blank, "w", **profile) as dst:
        dst.write(np.zeros((3, 256, 256), np.uint8))
    run = tmp_path / "run"
    args = ["model=reference", "tile_size=128", "workers=0", "progress=false"]
    assert run_mgpr_inprocess(f"input_path={blank}", *args, f"output_dir={run}") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["empty_inputs"] == [str(blank)]
    assert summary["hint"].startswith("nothing to measure: all 4 planned tiles are nodata")
    out = capsys.readouterr().out
    assert f"WARNING: every tile of {blank} is nodata" in out
    # the same command again: nothing left to predict, and the hint does not invent a bottleneck
    assert run_mgpr_inprocess(f"input_path={blank}", *args, f"output_dir={run}") == 0
    assert json.loads((run / "summary.json").read_text())["hint"].startswith("nothing to measure")
    # with a valid input beside it, only the blank one is named
    both = tmp_path / "both"
    assert run_mgpr_inprocess(f"input_path={tmp_path / 'in'}", *args, f"output_dir={both}") == 0
    summary = json.loads((both / "summary.json").read_text())
    assert summary["empty_inputs"] == [str(blank)]
    assert not summary["hint"].startswith("nothing to measure")
    # half the tiles were read and skipped: the model's share of the rate is told apart
    assert summary["tiles_predicted"] == summary["tiles_skipped_nodata"] == 4
    assert summary["model_tiles_per_s"] == pytest.approx(summary["tiles_per_s"] / 2, rel=0.01)
    assert "tiles/s through the model, the rest nodata or failed)" in capsys.readouterr().out
    assert "8 planned tiles (50%) are nodata: each is read" in summary["hint"]
