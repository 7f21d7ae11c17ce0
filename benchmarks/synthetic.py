"""Synthetic inputs and timing shared by the benchmarks that call mgpr's functions directly.

Each benchmark runs as ``python benchmarks/<name>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from affine import Affine

from mgpr.geo.raster import RasterInfo

T = TypeVar("T")


def raster_header(path: str, side: int, transform: Affine, crs_wkt: str | None) -> RasterInfo:
    """The header of a ``side`` px square uint8 RGB raster that is not on disk (no pixels)."""
    return RasterInfo(
        path=path,
        height=side,
        width=side,
        count=3,
        dtype="uint8",
        crs_wkt=crs_wkt,
        transform=transform,
        nodata=None,
        has_mask=False,
        block_shape=(512, 512),
        file_bytes=None,
        mtime=None,
        native_height=side,
        native_width=side,
        native_transform=transform,
    )


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """The fastest of ``repeat`` calls of ``fn`` in seconds, and the last call's result."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out
