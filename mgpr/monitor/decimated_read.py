"""Reading a whole raster at preview size (a few megapixels), fast and in bounded memory.

Two ways, chosen by :func:`read_preview_image`:

* the level GDAL would read (the coarsest overview still as fine as the preview, or the full
  resolution) is small (under 6 times the preview's size), or the rank has one CPU: GDAL's
  decimated read, strip by strip under a small block cache (:func:`read_decimated`);
* else (many orthomosaic exports have no overviews; some a 2x one only): every block of that
  level must be decoded once, whatever the method.
  GDAL's decimated read decodes them one after the other on one core (its resampling path does
  not run in parallel: 4.2 s alone, 3.9 s with two threads on two cores for a 20,000 px RGB
  raster), so :func:`average_full_resolution` decodes windows of whole blocks at full resolution
  on every CPU the rank may use and averages them with numpy (the DataLoader workers have stopped
  by then: the CPUs are idle).

A damaged file (a block that does not decode) still gets its preview: the windows of the
threaded read that fail are read again block by block and only the blocks that do not decode
are left out (nodata, one warning with the count), and GDAL's path
falls back to that read; above half of the windows unreadable the preview is given up.

The validity of a preview pixel (shown, or nodata) comes from the same read wherever it can:
reading the validity (:func:`mgpr.geo.validity.read_validity`) of a raster with a nodata value
decodes every block a second time (10.6 s on top of 5.1 s for that raster with nodata=0).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from mgpr.geo.headers import usable_cpus
from mgpr.geo.validity import read_validity, validity_source

log = logging.getLogger(__name__)

#: Source pixels read per strip by :func:`read_decimated`, bytes (a strip is full-width rows).
STRIP_BYTES = 64 * 2**20
#: GDAL block cache while a preview reads, bytes (a strip's blocks, and the next strip's
#: first block row when strips and block rows do not line up).
PREVIEW_CACHE_BYTES = 160 * 2**20
#: Source pixels one thread of :func:`average_full_resolution` holds at a time, bytes.
WINDOW_BYTES = 8 * 2**20
#: Threads that decode a preview's blocks at most (:func:`preview_threads`).
MAX_PREVIEW_THREADS = 16
#: Share of unreadable blocks above which a preview is given up (the file is not damaged in
#: places but unreadable: a preview of nodata would show nothing).
MAX_UNREADABLE_SHARE = 0.5


def preview_threads() -> int:
    """The CPUs this process may use (its affinity, as SLURM binds it), at most 16."""
    return max(1, min(MAX_PREVIEW_THREADS, usable_cpus()))


def read_decimated(
    src: Any,
    bands: Sequence[int] | None,
    shape: tuple[int, int],
    resampling: Resampling,
    strip_bytes: int = STRIP_BYTES,
) -> npt.NDArray[Any]:
    """``src.read(bands, out_shape=shape)``, or the validity when ``bands`` is None, by strips.

    The strips are full-width rows of about ``strip_bytes`` of source pixels, read under a
    bounded GDAL cache.

    Why: one decimated read of a raster without overviews makes GDAL decode every block into
    its block cache, which grows to GDAL_CACHEMAX (5 % of the node's RAM by default: +1.2 GiB
    on a 24 GiB node for a 20,000 px RGB raster) and stays allocated; strip by strip each block
    is still decoded once (the strips follow the block rows), as fast, and the rank's memory
    grows by a strip and :data:`PREVIEW_CACHE_BYTES`, whatever the raster's size. With
    overviews GDAL reads those for each strip, as for the whole.
    """
    big_h, big_w = src.height, src.width
    h, w = shape
    count = len(bands) if bands is not None else 1
    item = np.dtype(src.dtypes[0]).itemsize if bands is not None else 1
    block_h = max(1, int(src.block_shapes[0][0]))
    rows = max(block_h, strip_bytes // max(1, big_w * count * item) // block_h * block_h)
    out_rows = max(1, math.floor(rows * h / big_h))
    out: npt.NDArray[Any] | None = None
    with rasterio.Env(GDAL_CACHEMAX=PREVIEW_CACHE_BYTES):
        for o0 in range(0, h, out_rows):
            o1 = min(h, o0 + out_rows)
            r0 = round(o0 * big_h / h)
            r1 = big_h if o1 == h else round(o1 * big_h / h)
            window = Window(0, r0, big_w, max(1, r1 - r0))
            if bands is None:
                part = read_validity(
                    src, window=window, out_shape=(o1 - o0, w), resampling=resampling
                )
                part = part[None]
            else:
                part = src.read(
                    list(bands), window=window, out_shape=(count, o1 - o0, w), resampling=resampling
                )
            if out is None:
                out = np.empty((count, h, w), dtype=part.dtype)
            out[:, o0:o1] = part
    assert out is not None
    return out if bands is not None else out[0]


def _mask_kind(src: Any, bands: Sequence[int]) -> str:
    """How a pixel of ``bands`` is known to be nodata: ``none``, ``nodata`` or ``mask``.

    ``nodata``: by the nodata values of ``bands``, when they are every band of the raster (the
    validity rule ORs over all of them); ``mask``: by :func:`mgpr.geo.validity.read_validity`
    (an internal/external mask, an alpha band, or nodata values of bands not read).
    """
    source = validity_source(src)
    if source == "none":
        return "none"
    every_band = sorted(set(bands)) == list(range(1, src.count + 1))
    if source == "nodata" and every_band:
        return "nodata"
    return "mask"


def _valid_values(
    data: npt.NDArray[Any], nodata: Sequence[float | None]
) -> npt.NDArray[np.bool_] | None:
    """Pixels that hold a value in some band and no NaN in any band.

    A nodata value marks a pixel invalid only where every band holds it (the dataset mask's
    rule); NaN in any band does (a NaN cannot be averaged or drawn). None: every pixel is valid
    (integers without nodata).
    """
    valid: npt.NDArray[np.bool_] | None = None
    declared = [(band, v) for band, v in zip(data, nodata, strict=True) if v is not None]
    if declared and len(declared) == len(nodata):
        valid = np.zeros(data.shape[1:], bool)
        for band, value in declared:
            valid |= ~np.isnan(band) if math.isnan(value) else band != value
    if data.dtype.kind == "f":
        from mgpr.geo.values import real_values

        finite = real_values(data, axis=0)  # NaN, +-inf, +-3.4028235e38
        valid = finite if valid is None else valid & finite
    return valid


def _valid_decimated(
    src: Any, bands: Sequence[int], data: npt.NDArray[Any], shape: tuple[int, int]
) -> npt.NDArray[np.bool_]:
    """Where a decimated read ``data`` of ``bands`` shows the raster.

    GDAL's average leaves nodata values out, so a preview pixel holds nodata only where every
    pixel under it does.
    """
    kind = _mask_kind(src, bands)
    nodata = [src.nodatavals[b - 1] if kind == "nodata" else None for b in bands]
    valid = _valid_values(data, nodata)
    if kind == "mask":
        shown = read_decimated(src, None, shape, Resampling.nearest) > 0
        valid = shown if valid is None else valid & shown
    return np.ones(shape, bool) if valid is None else valid


def _block_windows(src: Any, count: int, item: int, window_bytes: int) -> Iterator[Window]:
    """Windows of whole blocks of about ``window_bytes`` (at least one block), row by row.

    Whole blocks so that each block is read once; columns are split only when a block row is
    larger than ``window_bytes``.
    """
    block_h, block_w = (max(1, int(v)) for v in src.block_shapes[0])
    blocks_across = math.ceil(src.width / block_w)
    per_window = max(1, window_bytes // max(1, block_h * block_w * count * item))
    if per_window >= blocks_across:
        cols, rows = src.width, block_h * (per_window // blocks_across)
    else:
        cols, rows = block_w * per_window, block_h
    for r0 in range(0, src.height, rows):
        for c0 in range(0, src.width, cols):
            yield Window(c0, r0, min(cols, src.width - c0), min(rows, src.height - r0))


def _blocks_of(src: Any, window: Window) -> Iterator[Window]:
    """The internal blocks of ``src`` inside ``window`` (a window of whole blocks), each clipped."""
    block_h, block_w = (max(1, int(v)) for v in src.block_shapes[0])
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    for r in range(r0, r1, block_h):
        for c in range(c0, c1, block_w):
            yield Window(c, r, min(block_w, c1 - c), min(block_h, r1 - r))


def _block_count(src: Any, window: Window) -> int:
    block_h, block_w = (max(1, int(v)) for v in src.block_shapes[0])
    return math.ceil(int(window.height) / block_h) * math.ceil(int(window.width) / block_w)


def _reason(exc: BaseException) -> str:
    """GDAL's own words for a failed read (rasterio's "Read failed" wraps them as the cause)."""
    cause = exc.__cause__ or exc
    return str(cause).split("\n")[0]


def _bins(index: npt.NDArray[np.intp], big: int, small: int) -> tuple[npt.NDArray[np.intp], int]:
    """Source pixels ``index`` (ascending) grouped by the output pixel holding them.

    Returns the positions in ``index`` where a new output pixel begins, and the first output
    pixel. Output pixel ``o`` holds source pixels ``s`` with ``s * small // big == o``.
    """
    out_index = index * small // big
    starts = np.flatnonzero(np.diff(out_index, prepend=out_index[0] - 1))
    return starts, int(out_index[0])


def sample_step(big: tuple[int, int], small: tuple[int, int]) -> int:
    """Every how many source rows and columns :func:`average_full_resolution` averages.

    About 4 x 4 samples per preview pixel: the decimation factor / 4, rounded (a factor of 62.5,
    a 100,000 px raster, averages every 16th row and column), 1 below a factor of 6. Why: the
    decode is the cost that cannot be avoided (every block holds preview pixels); averaging all
    of a 100,000 px raster's 30 G values in numpy took 5 times GDAL's whole decimated read, a
    4 x 4 sample is an anti-aliased quicklook at 1/250 of that.
    """
    factor = min(b / s for b, s in zip(big, small, strict=True))
    return max(1, round(factor / 4))


def average_full_resolution(
    src: Any,
    bands: Sequence[int],
    shape: tuple[int, int],
    threads: int | None = None,
    window_bytes: int = WINDOW_BYTES,
    overview_level: int | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """The mean of the valid source pixels under each preview pixel, and where there was one.

    Every block is decoded (at full resolution, by ``threads`` threads); the mean is over every
    :func:`sample_step`-th row and column of it.

    Args:
        src: an open raster (read by its name: each thread opens its own handle, since a
            dataset handle is not thread-safe; rasterio releases the GIL while GDAL decodes).
        bands: 1-based bands to read.
        shape: (rows, columns) of the preview; output pixel ``(i, j)`` covers source rows
            ``r`` with ``r * rows // height == i`` (and the same for columns).
        threads: decoding threads; default :func:`preview_threads`.
        window_bytes: source pixels one thread holds at a time.
        overview_level: ``src`` is this overview level of the file (0 = the first overview,
            rasterio's ``overview_level``), and every thread opens that level too.

    Returns:
        ``(data, valid)``: data ``(len(bands), rows, cols)`` in the raster's dtype (integers
        rounded; 0 where no pixel was valid), valid ``(rows, cols)``. Nodata values, NaN and
        masked pixels (mask or alpha band) are left out of the means.
    """
    h, w = shape
    big_h, big_w = src.height, src.width
    count = len(bands)
    dtype = np.dtype(src.dtypes[bands[0] - 1])
    kind = _mask_kind(src, bands)
    nodata = [src.nodatavals[b - 1] if kind == "nodata" else None for b in bands]
    step = sample_step((big_h, big_w), shape)
    # float32: 31 MiB for a 1600 px RGB preview; exact for sums of integers below 2**24, which
    # a preview pixel's samples (about 4 x 4, at most 36 below factor 6) of uint16 stay under.
    sums = np.zeros((count, h, w), np.float32)
    counts = np.zeros((h, w), np.int32)
    windows = _block_windows(src, count, dtype.itemsize, window_bytes)
    take = threading.Lock()
    add = threading.Lock()

    def accumulate(handle: Any, window: Window) -> None:
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        rows = np.arange(-(-r0 // step) * step, r1, step)  # the sampled rows, raster frame
        cols = np.arange(-(-c0 // step) * step, c1, step)
        if not rows.size or not cols.size:
            return
        picked = (slice(None), slice(rows[0] - r0, None, step), slice(cols[0] - c0, None, step))
        data = handle.read(list(bands), window=window)[picked]
        valid = _valid_values(data, nodata)
        if kind == "mask":
            shown = read_validity(handle, window=window)[picked[1:]] > 0
            valid = shown if valid is None else valid & shown
        row_starts, i0 = _bins(rows, big_h, h)
        col_starts, j0 = _bins(cols, big_w, w)
        if valid is None:
            part = np.add.reduceat(data, col_starts, axis=2, dtype=np.float64)
            part = np.add.reduceat(part, row_starts, axis=1)
            rows_n = np.diff(np.append(row_starts, rows.size))
            cols_n = np.diff(np.append(col_starts, cols.size))
            n = np.outer(rows_n, cols_n)
        else:
            kept = np.where(valid, data, 0)
            part = np.add.reduceat(kept, col_starts, axis=2, dtype=np.float64)
            part = np.add.reduceat(part, row_starts, axis=1)
            n = np.add.reduceat(valid, col_starts, axis=1, dtype=np.int64)
            n = np.add.reduceat(n, row_starts, axis=0)
        i1, j1 = i0 + part.shape[1], j0 + part.shape[2]
        with add:  # windows share the output pixels along their edges
            sums[:, i0:i1, j0:j1] += part
            counts[i0:i1, j0:j1] += n

    stop = threading.Event()  # a failed thread, or Ctrl-C / SIGTERM in the main thread
    tally = {"blocks": 0, "unreadable": 0}
    first_error: list[str] = []

    def worker() -> None:
        try:
            level = {} if overview_level is None else {"overview_level": overview_level}
            with rasterio.open(src.name, **level) as own:
                while not stop.is_set():
                    with take:
                        window = next(windows, None)
                    if window is None:
                        return
                    try:
                        accumulate(own, window)
                    except rasterio.errors.RasterioIOError:
                        # A damaged block: read the window block by block, so only the
                        # damaged blocks stay nodata (where they are is what the preview of
                        # such a file shows). Failed reads are quick: no early give-up.
                        for block in _blocks_of(own, window):
                            try:
                                accumulate(own, block)
                            except rasterio.errors.RasterioIOError as exc:
                                with take:
                                    tally["unreadable"] += 1
                                    first_error[:] = first_error or [_reason(exc)]
                    with take:
                        tally["blocks"] += _block_count(own, window)
        except BaseException:
            stop.set()
            raise

    threads = threads or preview_threads()
    # One GDAL cache for the process (rasterio sets GDAL_CACHEMAX with GDALSetCacheMax64), so
    # the main thread's Env bounds every thread's blocks.
    with rasterio.Env(GDAL_CACHEMAX=PREVIEW_CACHE_BYTES):
        with ThreadPoolExecutor(threads, thread_name_prefix="mgpr-preview") as pool:
            jobs = [pool.submit(worker) for _ in range(threads)]
            try:
                for done in jobs:
                    done.result()
            except BaseException:
                stop.set()  # the pool's exit then waits for the windows in flight only
                raise
    if tally["unreadable"] > MAX_UNREADABLE_SHARE * tally["blocks"]:
        raise rasterio.errors.RasterioIOError(
            f"{tally['unreadable']} of {tally['blocks']} blocks unreadable ({first_error[0]})"
        )
    if tally["unreadable"]:
        log.warning(
            "preview of %s: %d of %d blocks unreadable (%s), shown as nodata",
            src.name,
            tally["unreadable"],
            tally["blocks"],
            first_error[0] if first_error else "read error",
        )
    valid_out = counts > 0
    mean = sums / np.maximum(counts, 1)  # 0 where nothing was valid
    if dtype.kind != "f":
        info = np.iinfo(dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(dtype), valid_out


def read_preview_image(
    src: Any, bands: Sequence[int], shape: tuple[int, int]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """``bands`` of ``src`` averaged down to ``shape``, and where they show the raster.

    The level read is the one GDAL would pick: the coarsest overview still at least as fine as
    the preview (or the full resolution). GDAL's decimated read when that level is less than 6
    times the preview's size (there it decodes little, and a numpy mean of every pixel costs
    more than GDAL's), or on one CPU without nodata values (one thread decodes as fast as
    GDAL); else :func:`average_full_resolution` of that level on every idle CPU (a raster
    without overviews, or with a partial pyramid: a 2x overview alone of a 100,000 px raster is
    2.5 Gpx for one core).
    """
    factor = min(src.height / shape[0], src.width / shape[1])
    overviews = src.overviews(bands[0])  # decimation factors, as GDAL built them
    coarse = max((f for f in overviews if f <= factor), default=1)
    size = (math.ceil(src.height / coarse), math.ceil(src.width / coarse))
    small = sample_step(size, shape) == 1
    one_cpu = preview_threads() == 1 and _mask_kind(src, bands) != "nodata"
    if small or one_cpu:
        try:
            data = read_decimated(src, bands, shape, Resampling.average)
            return data, _valid_decimated(src, bands, data, shape)
        except rasterio.errors.RasterioIOError:
            pass  # a damaged block: read window by window below, skipping the damaged ones
    if coarse == 1:
        return average_full_resolution(src, bands, shape)
    index = overviews.index(coarse)
    with rasterio.open(src.name, overview_level=index) as overview:
        return average_full_resolution(overview, bands, shape, overview_level=index)
