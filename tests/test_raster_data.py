"""Inputs, windowed reads, nodata skipping, sharding and worker pickling (real GeoTIFFs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch.utils.data import DataLoader

from mgpr.data.dataset import STATUS_EMPTY, STATUS_FAILED, STATUS_OK, TileDataset
from mgpr.errors import ConfigError, InputError
from mgpr.geo.bands import check_bands
from mgpr.geo.inputs import resolve_inputs
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles


def test_resolve_inputs_file_folder_glob_list(make_image, tmp_path: Path, monkeypatch) -> None:
    a = make_image("a.tif", width=300, height=200)
    b = make_image("b.tif", width=300, height=200)
    assert resolve_inputs(str(a.path)) == [str(a.path)]
    assert resolve_inputs(str(tmp_path)) == sorted([str(a.path), str(b.path)])
    assert resolve_inputs(str(tmp_path / "*.tif")) == sorted([str(a.path), str(b.path)])
    listing = tmp_path / "list.txt"
    listing.write_text("# my rasters\nb.tif\n\n" + str(a.path) + "\n")
    assert resolve_inputs(str(listing)) == [str(b.path), str(a.path)]
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ in a list is the home folder
    (tmp_path / "tilde.txt").write_text("~/a.tif\n")
    assert resolve_inputs(str(tmp_path / "tilde.txt")) == [str(a.path)]
    windows = tmp_path / "windows.txt"  # a byte-order mark and CRLF, as Notepad saves it
    windows.write_bytes(b"\xef\xbb\xbfb.tif\r\na.tif\r\n")
    assert resolve_inputs(str(windows)) == [str(b.path), str(a.path)]
    assert resolve_inputs("/vsicurl/https://example.org/x.tif") == [
        "/vsicurl/https://example.org/x.tif"
    ]


def test_resolve_inputs_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs(str(tmp_path / "missing.tif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder without rasters"):
        resolve_inputs(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="glob matches no file"):
        resolve_inputs(str(tmp_path / "*.nothing"))
    listing = tmp_path / "list.txt"
    listing.write_text("ok.tif\n")
    with pytest.raises(InputError, match=r"list.txt:1 names 'ok.tif'"):
        resolve_inputs(str(listing))


def test_a_run_never_reads_its_own_results(make_image, tmp_path: Path) -> None:
    """A recursive glob over the data skips the run's result folders and GDAL side files."""
    a = make_image("data/a.tif", width=64, height=64)
    run = tmp_path / "data" / "runs" / "x"
    own = [run / "parts", run / "merge", run / "segmentation"]
    make_image("data/runs/x/segmentation/a.tif", width=64, height=64)
    make_image("data/runs/x/parts/p.seg.r0c0-1.tif", width=64, height=64)
    (tmp_path / "data" / "a.tif.aux.xml").write_text("<PAMDataset/>")
    (tmp_path / "data" / "a.tif.ovr").write_bytes(b"")
    pattern = str(tmp_path / "data" / "**" / "a.tif*")
    assert resolve_inputs(pattern, own) == [str(a.path)]
    assert resolve_inputs(str(tmp_path / "data" / "**" / "*.tif"), own) == [str(a.path)]
    # without the run's folders (another output_dir) the earlier class maps are inputs
    assert len(resolve_inputs(str(tmp_path / "data" / "**" / "*.tif"))) == 3
    with pytest.raises(InputError, match=r"lies in .*segmentation', a folder this run writes"):
        resolve_inputs(str(run / "segmentation" / "a.tif"), own)
    with pytest.raises(InputError, match=r"lies in .*segmentation'"):
        resolve_inputs(str(run / "segmentation"), own)
    with pytest.raises(InputError, match="matches only this run's own results"):
        resolve_inputs(str(run / "**" / "*.tif"), own)


def test_own_results_found_through_symlinks_and_relative_names(
    make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result folder reached through a symlinked file, a symlinked folder or a relative name."""
    make_image("data/a.tif", width=64, height=64)
    seg = tmp_path / "runs" / "x" / "segmentation"
    own = [seg]
    inside = make_image("runs/x/segmentation/b.tif", width=64, height=64)
    (tmp_path / "data" / "b.tif").symlink_to(inside.path)  # a file link into the results
    (tmp_path / "view").symlink_to(seg, target_is_directory=True)  # a folder link to them
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"'data/b.tif' lies in .*segmentation'"):
        resolve_inputs(["data/a.tif", "data/b.tif"], own)
    with pytest.raises(InputError, match=r"lies in .*segmentation'"):
        resolve_inputs("view/b.tif", own)
    with pytest.raises(InputError, match=r"lies in .*segmentation'"):
        resolve_inputs("runs/x/segmentation/../segmentation/b.tif", own)
    assert resolve_inputs("data/*.tif", own) == ["data/a.tif"]  # a glob skips the link


def test_not_a_raster(tmp_path: Path) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a readable raster"):
        describe_raster(str(bad))


def test_band_checks(make_image) -> None:
    info = describe_raster(str(make_image(width=64, height=64, bands=4).path))
    assert check_bands(info, None, 3) == [1, 2, 3]
    assert check_bands(info, [3, 2, 1], 3) == [3, 2, 1]
    assert check_bands(info, None, 0) == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="band 5"):
        check_bands(info, [1, 2, 5], 3)
    one = describe_raster(str(make_image("one.tif", width=64, height=64, bands=1).path))
    with pytest.raises(ConfigError, match="needs 3"):
        check_bands(one, None, 3)


def test_tile_reads_match_rasterio_and_pad_edges(make_image) -> None:
    img = make_image(width=300, height=200, bands=3)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 16)
    reader = TileReader({info.path: [1, 2, 3]}, 128)
    with rasterio.open(img.path) as src:
        full = src.read()
    for tile in tiles:
        arr = reader.read(tile)
        assert arr.shape == (3, 128, 128) and arr.dtype == np.uint8
        part = full[
            :,
            tile.row_off : tile.row_off + tile.valid_height,
            tile.col_off : tile.col_off + tile.valid_width,
        ]
        np.testing.assert_array_equal(arr[:, : tile.valid_height, : tile.valid_width], part)
        assert not arr[:, tile.valid_height :, :].any() and not arr[:, :, tile.valid_width :].any()


def test_a_reader_keeps_a_bounded_number_of_files_open(
    make_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of small inputs must not hold one descriptor each (EMFILE under ulimit -n)."""
    import pickle

    import mgpr.geo.handles

    monkeypatch.setattr(mgpr.geo.handles, "MAX_OPEN_RASTERS", 2)
    imgs = [make_image(f"t{i}.tif", width=40, height=30, seed=i) for i in range(5)]
    reader = TileReader({str(i.path): [1, 2, 3] for i in imgs}, 64)
    for img in [*imgs, imgs[0]]:  # the first one again, after it was closed
        (tile,) = plan_tiles(str(img.path), 30, 40, 64, 0)
        with rasterio.open(img.path) as src:
            want = src.read()
        np.testing.assert_array_equal(reader.read(tile)[:, :30, :40], want)
        assert len(reader._handles) <= 2
    copy = pickle.loads(pickle.dumps(reader))  # a spawned worker: no handles travel
    assert len(copy._handles) == 0 and copy.read(tile).shape == (3, 64, 64)
    reader.close()
    assert len(reader._handles) == 0


@pytest.mark.parametrize("mode", ["value", "mask"])
def test_nodata_tiles_are_skipped(make_image, mode: str) -> None:
    img = make_image(width=512, height=512, nodata="border", nodata_mode=mode)
    info = describe_raster(str(img.path))
    assert info.has_mask
    tiles = plan_tiles(info.path, info.height, info.width, 32, 0)
    ds = TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, 32), {info.path})
    statuses = [int(ds[i]["status"]) for i in range(len(ds))]
    assert STATUS_EMPTY in statuses and STATUS_OK in statuses
    with rasterio.open(img.path) as src:
        mask = src.dataset_mask()
    for tile, status in zip(tiles, statuses, strict=True):
        window_mask = mask[
            tile.row_off : tile.row_off + tile.valid_height,
            tile.col_off : tile.col_off + tile.valid_width,
        ]
        assert (status == STATUS_EMPTY) == (not window_mask.any())


def test_failed_read_is_recorded_not_raised(make_image, tmp_path: Path) -> None:
    img = make_image(width=256, height=256)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 0)
    ds = TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, 128), set())
    img.path.unlink()  # the file vanishes after planning: every read fails
    sample = ds[0]
    assert int(sample["status"]) == STATUS_FAILED and sample["reason"]


def test_dataset_pickles_and_runs_under_spawn(make_image) -> None:
    img = make_image(width=256, height=256)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 0)
    ds = TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, 128), set())
    _ = ds[0]  # opens a handle in this process; pickling must drop it
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone.reader._handles) == 0
    loader = DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    indexes = np.concatenate([np.asarray(b["index"]) for b in loader]).tolist()
    assert indexes == list(range(len(tiles)))


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_dataloader_batches_equal_single_reads(make_image, workers: int) -> None:
    """Batches decoded straight into shared memory (no collate copy) hold the same pixels,
    indexes and statuses as per-tile reads, edge padding included."""
    from mgpr.run.trainer import make_dataloader

    img = make_image(width=300, height=200)
    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 0)
    ds = TileDataset(tiles, TileReader({info.path: [1, 2, 3]}, 128), set())
    batches = list(make_dataloader(ds, 4, workers, pin_memory=False))
    images = torch.cat([b["image"] for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (len(tiles), 3, 128, 128)
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(len(tiles)))
    assert np.concatenate([b["status"] for b in batches]).tolist() == [STATUS_OK] * len(tiles)
    assert [r for b in batches for r in b["reason"]] == [""] * len(tiles)
    for i in range(len(tiles)):
        assert torch.equal(images[i], ds[i]["image"])
    # default collate still works on TileDataset (users' own DataLoaders)
    plain = next(iter(DataLoader(ds, batch_size=3)))
    assert torch.equal(plain["image"], images[:3])


def test_a_codec_gdal_lacks_is_named_with_the_recompression(make_image, tmp_path: Path) -> None:
    """A JPEG-XL GeoTIFF (written by a GDAL with libjxl) read by rasterio's GDAL, which has no
    JXL decoder: the TIFF's compression tag is set to JXL's (50002) to stand for one."""
    import struct

    try:  # a GDAL that can write JXL can read it: nothing to refuse
        with rasterio.open(
            tmp_path / "probe.tif", "w", driver="GTiff", width=8, height=8, count=1,
            dtype="uint8", compress="JXL",
        ) as probe:  # fmt: skip
            probe.write(np.zeros((1, 8, 8), dtype=np.uint8))
        pytest.skip(f"GDAL {rasterio.__gdal_version__} has a JXL codec")
    except rasterio.errors.RasterioError:
        pass
    img = make_image("ortho.tif", width=64, height=64)
    data = bytearray(Path(img.path).read_bytes())
    assert data[:4] == b"II*\x00"  # classic little-endian TIFF
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 259:  # Compression
            struct.pack_into("<H", data, entry + 8, 50002)
    jxl = tmp_path / "jxl.tif"
    jxl.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        describe_raster(str(jxl))
    msg = str(err.value)
    assert "is compressed with JXL" in msg and f"GDAL {rasterio.__gdal_version__}" in msg
    assert f"gdal_translate -co COMPRESS=DEFLATE -co TILED=YES {jxl} deflate.tif" in msg
