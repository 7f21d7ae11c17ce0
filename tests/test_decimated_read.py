"""Reading a raster at preview size: block means on every CPU, nodata left out, overviews used."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from conftest import write_array
from rasterio.enums import Resampling

from mgpr.monitor import decimated_read
from mgpr.monitor.decimated_read import (
    average_full_resolution,
    read_preview_image,
    sample_step,
)
from mgpr.testimage import TestImageResult


def _write(path: Path, data: np.ndarray, nodata: float | None = None, block: int = 64) -> Path:
    """Tiled in ``block`` px blocks (64 by default: several windows on small rasters)."""
    return write_array(path, data, nodata=nodata, block=block)


def _block_means(data: np.ndarray, factor: int, valid: np.ndarray) -> np.ndarray:
    b, h, w = data.shape
    keep = valid.astype(np.float64)
    sums = (data * keep).reshape(b, h // factor, factor, w // factor, factor).sum(axis=(2, 4))
    counts = keep.reshape(h // factor, factor, w // factor, factor).sum(axis=(1, 3))
    return sums / np.maximum(counts, 1)


@pytest.mark.parametrize("threads", [1, 3])
def test_block_means_at_an_integer_factor_match_numpy_and_gdal(
    make_image: Callable[..., TestImageResult], threads: int
) -> None:
    """Windows far smaller than a block row (columns split) and several threads give the exact
    mean of each 4 x 4 block, as GDAL's average does."""
    img = make_image(width=1024, height=768, objects=6, block_size=64)
    with rasterio.open(img.path) as src:
        full = src.read()
        data, valid = average_full_resolution(
            src, [1, 2, 3], (192, 256), threads=threads, window_bytes=3 * 64 * 64 * 2
        )
        gdal = src.read([1, 2, 3], out_shape=(3, 192, 256), resampling=Resampling.average)
    expected = _block_means(full.astype(np.float64), 4, np.ones(full.shape[1:], bool))
    assert data.dtype == np.uint8 and valid.all()
    assert np.abs(data.astype(int) - np.rint(expected)).max() == 0
    assert np.abs(data.astype(int) - gdal).max() <= 1


def test_nodata_values_are_left_out_of_the_means_and_make_the_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (3, 256, 320), dtype=np.uint8)
    data[:, :, :100] = 0  # nodata: a left border (across two 4-px preview columns' edges)
    data[1, 200:, 200:] = 0  # one band 0: still valid (the dataset mask's rule)
    path = _write(tmp_path / "nd.tif", data, nodata=0)
    with rasterio.open(path) as src:
        out, valid = average_full_resolution(src, [1, 2, 3], (64, 80), threads=2)
        mask = src.dataset_mask(out_shape=(64, 80), resampling=Resampling.average) > 0
    px_valid = (data != 0).any(axis=0)
    assert np.array_equal(valid, mask)
    assert not valid[:, :25].any() and valid[:, 25:].all()  # column 25 holds source 100..103
    expected = _block_means(data.astype(np.float64), 4, px_valid)
    assert np.array_equal(out[:, valid], np.rint(expected)[:, valid].astype(np.uint8))
    assert (out[:, ~valid] == 0).all()


def test_an_internal_mask_and_nan_are_left_out(tmp_path: Path) -> None:
    data = np.full((1, 128, 128), 7.0, np.float32)
    data[0, :, 64:] = 100.0
    data[0, :8, :8] = np.nan  # undeclared NaN
    path = _write(tmp_path / "m.tif", data)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        mask = np.full((128, 128), 255, np.uint8)
        mask[:, 64:] = 0  # the 100s are masked out
        dst.write_mask(mask)
    with rasterio.open(path) as src:
        out, valid = average_full_resolution(src, [1], (32, 32), threads=2)
    assert out.dtype == np.float32
    assert not valid[:, 16:].any() and not valid[:2, :2].any()
    assert valid[2:, :16].all() and np.allclose(out[0][valid], 7.0)


def test_a_large_factor_averages_a_regular_sample(tmp_path: Path) -> None:
    """Factor 40: every 10th row and column (4 x 4 samples per preview pixel), the same with
    one thread or three."""
    assert sample_step((100_000, 100_000), (1600, 1600)) == 16
    assert sample_step((768, 1024), (192, 256)) == 1 and sample_step((900, 900), (100, 100)) == 2
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (1, 640, 800), dtype=np.uint8)
    path = _write(tmp_path / "big.tif", data, block=32)
    with rasterio.open(path) as src:
        one, _ = average_full_resolution(src, [1], (16, 20), threads=1, window_bytes=4096)
        three, _ = average_full_resolution(src, [1], (16, 20), threads=3, window_bytes=4096)
    sample = data[:, ::10, ::10].astype(np.float64)
    expected = sample.reshape(1, 16, 4, 20, 4).mean(axis=(2, 4))
    assert np.array_equal(one, three)
    assert np.array_equal(one, np.rint(expected).astype(np.uint8))


def test_a_raster_with_overviews_is_read_through_them(
    make_image: Callable[..., TestImageResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overviews GDAL's decimated read is the cheap one: no block of the full resolution
    is decoded by mgpr; the nodata mask comes from the same read."""
    img = make_image(width=1024, height=1024, overviews=True, nodata="border")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("full-resolution read of a raster with overviews")

    monkeypatch.setattr(decimated_read, "average_full_resolution", refuse)
    with rasterio.open(img.path) as src:
        data, valid = read_preview_image(src, [1, 2, 3], (64, 64))
        mask = src.dataset_mask(out_shape=(64, 64), resampling=Resampling.average) > 0
    assert data.shape == (3, 64, 64)
    assert (valid != mask).mean() < 0.02 and not valid.all() and valid.any()


@pytest.mark.parametrize(
    ("side", "nodata", "cpus", "full_resolution"),
    [
        (1024, None, 4, True),  # factor 16, no overviews, idle CPUs: mgpr's threads
        (1024, 0, 1, True),  # one CPU, but a nodata value: GDAL would read the blocks twice
        (1024, None, 1, False),  # one CPU, no nodata: GDAL's one decode is as fast
        (256, None, 4, False),  # factor 4: GDAL's average, numpy would cost more
    ],
)
def test_which_read_a_preview_takes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    side: int,
    nodata: int | None,
    cpus: int,
    full_resolution: bool,
) -> None:
    data = np.random.default_rng(2).integers(1, 255, (3, side, side), dtype=np.uint8)
    data[:, : side // 4] = 0
    path = _write(tmp_path / "r.tif", data, nodata=nodata)
    calls: list[int] = []
    real = decimated_read.average_full_resolution

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decimated_read, "average_full_resolution", spy)
    monkeypatch.setattr(decimated_read, "preview_threads", lambda: cpus)
    with rasterio.open(path) as src:
        out, valid = read_preview_image(src, [1, 2, 3], (64, 64))
    assert bool(calls) is full_resolution
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    assert valid.all() if nodata is None else (not valid[:16].any() and valid[16:].all())


def _threads_read_through(
    monkeypatch: pytest.MonkeyPatch, read: Callable[..., np.ndarray]
) -> Callable[..., Any]:
    """Make every handle the preview's threads open read through ``read(handle, ...)``;
    returns the real ``rasterio.open``."""
    real_open = rasterio.open

    class Handle:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Handle:
            return self

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def read(self, *args: Any, **kwargs: Any) -> np.ndarray:
            return read(self.handle, *args, **kwargs)

    monkeypatch.setattr(decimated_read.rasterio, "open", lambda p: Handle(real_open(p)))
    return real_open


def test_a_failing_window_stops_every_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is not a damaged block (a bug, memory) ends the read at once with that
    error, instead of the other threads decoding the rest of the raster first; the preview is
    then skipped."""
    data = np.random.default_rng(3).integers(0, 255, (1, 512, 512), dtype=np.uint8)
    path = _write(tmp_path / "r.tif", data, block=16)
    seen: list[int] = []

    def read(handle: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        seen.append(1)
        if len(seen) == 3:
            raise MemoryError("out of memory")
        return handle.read(*args, **kwargs)

    real_open = _threads_read_through(monkeypatch, read)
    with real_open(path) as src, pytest.raises(MemoryError):
        average_full_resolution(src, [1], (16, 16), threads=2, window_bytes=256)
    assert len(seen) < 20  # of 1,024 windows


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_damaged_block_is_nodata_in_the_preview_the_rest_is_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cpus: int
) -> None:
    """A block that does not decode (a bad sector, a truncated copy) leaves its pixels nodata;
    the preview of every other block is the same as the undamaged file's. With one CPU GDAL's
    read fails on it and the window-by-window read takes over."""
    from mgpr.testimage.damage import corrupt_block

    data = np.random.default_rng(5).integers(1, 255, (3, 512, 512), dtype=np.uint8)
    good = write_array(tmp_path / "good.tif", data, block=64, compress="deflate")
    bad = write_array(tmp_path / "bad.tif", data, block=64, compress="deflate")
    corrupt_block(bad, 2, 3)  # rows 128..191, columns 192..255
    monkeypatch.setattr(decimated_read, "preview_threads", lambda: cpus)
    with rasterio.open(good) as src:  # what the damaged file's read does, on the good file
        expected, expected_valid = average_full_resolution(src, [1, 2, 3], (64, 64), threads=1)
    with rasterio.open(bad) as src:
        out, valid = read_preview_image(src, [1, 2, 3], (64, 64))
    hole = np.zeros((64, 64), bool)
    hole[16:24, 24:32] = True  # the damaged block at 1/8 scale
    assert not valid[hole].any() and valid[~hole].all() and expected_valid.all()
    assert (out[:, ~hole] == expected[:, ~hole]).all()
    assert "1 of 64 blocks unreadable" in caplog.text and "shown as nodata" in caplog.text


def test_a_mostly_unreadable_file_gives_up_the_preview(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than half of the windows unreadable: no preview of nodata, the error instead."""
    data = np.random.default_rng(6).integers(0, 255, (1, 512, 512), dtype=np.uint8)
    path = _write(tmp_path / "r.tif", data, block=16)

    def read(handle: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        raise rasterio.errors.RasterioIOError("IReadBlock failed")

    real_open = _threads_read_through(monkeypatch, read)
    with real_open(path) as src, pytest.raises(rasterio.errors.RasterioIOError):
        average_full_resolution(src, [1], (16, 16), threads=2, window_bytes=256)


def test_a_partial_pyramid_is_averaged_from_its_coarsest_overview(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2x overview alone: the level GDAL would pick (the 2x) is read by mgpr's threads, not
    the full resolution and not GDAL's one core; the result matches GDAL's within a few levels."""
    data = np.random.default_rng(4).integers(1, 255, (3, 1024, 1024), dtype=np.uint8)
    path = _write(tmp_path / "p.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2], Resampling.average)
    calls: list[tuple[int, int | None]] = []
    real = decimated_read.average_full_resolution

    def spy(src: object, *args: object, **kwargs: object) -> object:
        calls.append((src.width, kwargs.get("overview_level")))  # type: ignore[attr-defined]
        return real(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(decimated_read, "average_full_resolution", spy)
    monkeypatch.setattr(decimated_read, "preview_threads", lambda: 2)
    with rasterio.open(path) as src:
        out, valid = read_preview_image(src, [1, 2, 3], (32, 32))
        gdal = src.read([1, 2, 3], out_shape=(3, 32, 32), resampling=Resampling.average)
    assert calls == [(512, 0)]
    assert out.shape == (3, 32, 32) and valid.all()
    assert np.abs(out.astype(int) - gdal).mean() < 8  # a 4 x 4 sample of noise vs every pixel
