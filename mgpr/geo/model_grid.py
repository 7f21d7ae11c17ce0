"""The model grid: a raster seen at the model's ground sample distance (``gsd=``), pure maths.

With ``gsd`` set, a run works on a MODEL GRID per raster: pixels of ``gsd`` metres over the
same ground. Per axis, with the raster's NATIVE pixel size ``res`` (metres, from its transform)
the factor ``f = gsd / res`` is native pixels per model pixel (``f > 1``: the model grid is
coarser and the raster is downsampled, a 3 cm drone mosaic for a 10 cm model has ``f = 3.33``;
``f < 1``: upsampled). Model pixel ``(row, col)`` covers the native pixels
``[col * f_x, (col + 1) * f_x) x [row * f_y, (row + 1) * f_y)``, so:

* the model grid is ``ceil(native / f)`` pixels per axis: the last model pixel may reach up to
  one model pixel past the raster's edge (it is read from the native pixels that exist);
* its pixel corner -> map transform is ``native_transform * Affine.scale(f_x, f_y)``.

The tile plan, ``tile_size``/``overlap``, boxes, footprints, seam de-duplication and
georeferencing all work on the model grid unchanged (boxes map to the CRS exactly through the
model-grid transform). Only the reader maps a model-grid window to the native window it covers
(:meth:`ModelGrid.windows`) and reads it with ``out_shape`` and the chosen resampling.

Factors are rounded to 9 decimals (:func:`gsd_factors`) so that ``0.15 / 0.1`` is ``1.5`` and
grid sizes do not depend on the last bit of a float. No file IO and no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from affine import Affine
from rasterio.windows import Window

from mgpr.geo.tiling import Tile

__all__ = [
    "RESAMPLINGS",
    "AxisSpan",
    "ModelGrid",
    "gsd_factors",
    "model_size",
    "model_transform",
    "native_spans",
    "resolve_resampling",
]

#: ``resampling=`` values: ``auto`` and GDAL's RasterIO resampling methods (rasterio names).
RESAMPLINGS = ("auto", "average", "bilinear", "cubic", "cubic_spline", "lanczos", "nearest", "mode")
#: What ``resampling=auto`` becomes: average when downsampling (every native pixel counts, no
#: aliasing), bilinear when upsampling (average and nearest would repeat pixels as blocks).
AUTO_DOWN, AUTO_UP = "average", "bilinear"
#: Slack, in pixels, for float sizes that are whole numbers up to rounding.
_EPS = 1e-6


def gsd_factors(transform: Affine, gsd: float) -> tuple[float, float]:
    """Native pixels per model pixel, ``(f_x, f_y)``, for a north-up transform.

    Args:
        transform: the raster's pixel corner -> map transform; no rotation (``b = d = 0``),
            the caller checks.
        gsd: model pixel size, in the transform's units (metres).

    Returns:
        ``(gsd / |a|, gsd / |e|)`` rounded to 9 decimals.
    """
    return round(gsd / abs(transform.a), 9), round(gsd / abs(transform.e), 9)


def model_size(native: int, factor: float) -> int:
    """Model pixels along one axis: ``ceil(native / factor)``, at least 1."""
    return max(1, math.ceil(native / factor - _EPS))


def model_transform(native_transform: Affine, factor_x: float, factor_y: float) -> Affine:
    """The model grid's pixel corner -> map transform: native ``* Affine.scale(f_x, f_y)``."""
    return native_transform * Affine.scale(factor_x, factor_y)


def resolve_resampling(name: str, factor_x: float, factor_y: float) -> str:
    """``resampling=`` for one raster; any name but ``auto`` passes through.

    ``auto`` is average when any axis is downsampled, else bilinear.
    """
    if name != "auto":
        return name
    return AUTO_DOWN if max(factor_x, factor_y) > 1.0 else AUTO_UP


class AxisSpan(NamedTuple):
    """One span of a tile along one axis: model pixels and the native pixels they come from.

    Model pixels ``[model_start, model_start + model_len)``, relative to the tile, are read
    from native pixels ``[native_start, native_start + native_len)`` (floats).
    """

    model_start: int
    model_len: int
    native_start: float
    native_len: float


def native_spans(offset: int, length: int, factor: float, native_size: int) -> list[AxisSpan]:
    """The native spans of model pixels ``[offset, offset + length)`` along one axis.

    Model pixel ``j`` covers native ``[j * f, (j + 1) * f)``. The model pixels wholly inside the
    raster (``j < full = floor(native_size / f)``) are one span at exactly ``f`` native pixels
    each; a last model pixel that reaches past the raster edge is its own span, read from the
    native pixels that exist, ``[full * f, native_size)``. So at most two spans; every model
    pixel keeps its exact footprint.

    Args:
        offset: model pixels, first pixel of the window (a tile's ``row_off`` / ``col_off``).
        length: model pixels, the window's part inside the model grid (``valid_height`` /
            ``valid_width``), >= 1.
        factor: native pixels per model pixel along this axis.
        native_size: native pixels along this axis.

    Returns:
        Spans in order, ``model_start`` relative to ``offset``.
    """
    full = min(math.floor(native_size / factor + _EPS), model_size(native_size, factor))
    end = offset + length
    spans: list[AxisSpan] = []
    if offset < full:
        stop = min(end, full)
        start_px = offset * factor
        stop_px = min(stop * factor, float(native_size))
        spans.append(AxisSpan(0, stop - offset, start_px, stop_px - start_px))
    if end > full:  # the partial last model pixel (model_size = full + 1 then)
        start_px = full * factor
        spans.append(AxisSpan(full - offset, end - full, start_px, native_size - start_px))
    return spans


@dataclass(frozen=True, slots=True)
class ModelGrid:
    """How one raster's model grid lies on its native pixels: what the reader needs.

    Attributes:
        factor_x: native pixels per model pixel along columns.
        factor_y: native pixels per model pixel along rows.
        native_height: native rows.
        native_width: native columns.
        resampling: GDAL resampling (a rasterio ``Resampling`` name, never ``auto``).
    """

    factor_x: float
    factor_y: float
    native_height: int
    native_width: int
    resampling: str

    @property
    def height(self) -> int:
        """Model-grid rows."""
        return model_size(self.native_height, self.factor_y)

    @property
    def width(self) -> int:
        """Model-grid columns."""
        return model_size(self.native_width, self.factor_x)

    def windows(self, tile: Tile) -> list[tuple[int, int, int, int, Window]]:
        """What to read for a tile planned on this grid: up to four parts.

        Returns:
            ``(row, col, height, width, native_window)`` per part: model pixels relative to the
            tile (write the part's ``out_shape=(C, height, width)`` read there) and the float
            native window it covers. Together they cover the tile's valid part exactly; the
            rest of the tile is padding.
        """
        rows = native_spans(tile.row_off, tile.valid_height, self.factor_y, self.native_height)
        cols = native_spans(tile.col_off, tile.valid_width, self.factor_x, self.native_width)
        return [
            (r.model_start, c.model_start, r.model_len, c.model_len, _window(r, c))
            for r in rows
            for c in cols
        ]

    def native_cover(self, tile: Tile) -> Window:
        """The whole native pixels the tile's valid part touches (an integer window, clipped).

        For a nodata check, where a pixel partly covered counts.
        """
        r0 = math.floor(tile.row_off * self.factor_y + _EPS)
        c0 = math.floor(tile.col_off * self.factor_x + _EPS)
        r1 = min(
            self.native_height, math.ceil((tile.row_off + tile.valid_height) * self.factor_y - _EPS)
        )
        c1 = min(
            self.native_width, math.ceil((tile.col_off + tile.valid_width) * self.factor_x - _EPS)
        )
        return Window(col_off=c0, row_off=r0, width=max(1, c1 - c0), height=max(1, r1 - r0))


def _window(rows: AxisSpan, cols: AxisSpan) -> Window:
    return Window(
        col_off=cols.native_start,
        row_off=rows.native_start,
        width=cols.native_len,
        height=rows.native_len,
    )
