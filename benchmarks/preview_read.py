"""What does reading a raster without overviews for its preview cost? Old path against new.

What it measures: ``benchmarks/README.md``; figures: the main README ("Preview of a raster
without overviews").

One RGB uint8 raster from mgpr's generator (``--size`` px square, DEFLATE, 512 px blocks, no
overviews), written once with no nodata and once with nodata=0 declared (the same pixels), read
at the preview's size (:data:`mgpr.monitor.preview.MAX_PREVIEW_PX` on the longer side) by:

* ``gdal``: the path before: GDAL's decimated average strip by strip, then ``dataset_mask``
  decimated (nearest) for the nodata colour;
* ``mgpr 1 thread`` / ``mgpr N threads``: :func:`mgpr.monitor.decimated_read.read_preview_image`
  (every block decoded at full resolution by N threads, a regular sample averaged, validity from
  the same read), N = :func:`~mgpr.monitor.decimated_read.preview_threads`.

Rounds interleaved, best kept; seconds and the ratio to ``gdal`` on the same file.

    uv run python benchmarks/preview_read.py --size 20000 --repeat 2
    uv run python benchmarks/preview_read.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rasterio
from rasterio.enums import Resampling

from mgpr.monitor import decimated_read
from mgpr.monitor.decimated_read import preview_threads, read_decimated, sample_step
from mgpr.monitor.preview import MAX_PREVIEW_PX, _decimated_shape
from mgpr.testimage import TestImageSpec, write_test_image


def gdal_path(src: Any, shape: tuple[int, int]) -> None:
    read_decimated(src, [1, 2, 3], shape, Resampling.average)
    read_decimated(src, None, shape, Resampling.nearest)


def mgpr_path(threads: int) -> Callable[[Any, tuple[int, int]], None]:
    def read(src: Any, shape: tuple[int, int]) -> None:
        decimated_read.average_full_resolution(src, [1, 2, 3], shape, threads=threads)

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="raster side, pixels")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds (best kept)")
    ap.add_argument("--quick", action="store_true", help="6000 px, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = 6000, 1
    threads = preview_threads()
    rows: dict[str, Callable[[Any, tuple[int, int]], None]] = {"gdal": gdal_path}
    rows["mgpr 1 thread"] = mgpr_path(1)
    if threads > 1:
        rows[f"mgpr {threads} threads"] = mgpr_path(threads)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.tif"
        write_test_image(plain, TestImageSpec(width=args.size, height=args.size, block_size=512))
        with_nodata = Path(tmp) / "nodata0.tif"
        shutil.copy(plain, with_nodata)
        with rasterio.open(with_nodata, "r+") as dst:
            dst.nodata = 0
        mpx = args.size**2 / 1e6
        h, w, _scale = _decimated_shape(args.size, args.size, MAX_PREVIEW_PX)
        step = sample_step((args.size, args.size), (h, w))
        print(f"raster {args.size} x {args.size} RGB uint8 ({mpx:.0f} Mpx), no overviews")
        print(f"preview {w} x {h} px, 1 in {step} rows/columns averaged; {threads} usable CPU(s)")
        for path in (plain, with_nodata):
            best = {name: float("inf") for name in rows}
            for _ in range(args.repeat):
                for name, read in rows.items():
                    with rasterio.open(path) as src:
                        t0 = time.perf_counter()
                        read(src, (h, w))
                        best[name] = min(best[name], time.perf_counter() - t0)
            print(f"\n{path.name}")
            for name, seconds in best.items():
                ratio = best["gdal"] / seconds
                print(f"  {name:<18} {seconds:7.2f} s  {mpx / seconds:7.0f} Mpx/s  x{ratio:.2f}")


if __name__ == "__main__":
    main()
