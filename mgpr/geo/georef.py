"""Pixel <-> map coordinates for tiles.

Pixels are ``row, col`` (``y = row``, ``x = col``), and box coordinates are pixel CORNER
coordinates: ``(0, 0)`` is the upper-left corner of the upper-left pixel and ``(width, height)``
the lower-right corner of the lower-right pixel, so a box ``[x1, y1, x2, y2]`` covering pixel
``(row, col)`` exactly is ``[col, row, col + 1, row + 1]``. Map coordinates are ``x, y`` in the
raster's CRS, as given by its affine ``transform`` (``x_map, y_map = transform @ (col, row)``, the
same convention as ``rasterio.transform.xy(..., offset="ul")``). Nothing here rounds: fractional
pixels map to fractional map coordinates and back.

Rasters without a CRS: rasterio gives them the identity transform, and every function here works
unchanged; map coordinates are then pixel corner coordinates (``x = col``, ``y = row``, y pointing
down).

Pure geometry: only numpy, ``affine`` and rasterio's pure helpers; no file IO, no torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from mgpr.geo.tiling import Tile, as_boxes, tile_window, valid_window

__all__ = [
    "boxes_to_rings",
    "raster_footprint",
    "pixel_size",
    "tile_boxes_to_raster_px",
    "tile_footprint_ring",
]


def boxes_to_rings(boxes_px: npt.ArrayLike, transform: Affine) -> npt.NDArray[np.float64]:
    """Turn pixel boxes into closed polygon rings in map coordinates.

    All four corners of each box are transformed (not just two), so rotated and sheared transforms
    give the true parallelogram. Corners are pixel CORNER coordinates; no rounding. Each box is
    normalised first (``min``/``max`` per axis), and the corner order is chosen from the sign of
    the transform's determinant so every ring is counter-clockwise in map space (positive
    shoelace area; the exterior-ring orientation GeoPackage/OGC expects): north-up rasters
    (negative ``e``) and no-CRS identity transforms alike.

    Args:
        boxes_px: (N, 4) float xyxy, pixel corner coordinates (x = col, y = row) in the frame
            ``transform`` maps from (raster pixels with the raster's own transform).
        transform: pixel corner ``(col, row)`` -> map ``(x, y)``.

    Returns:
        (N, 5, 2) float64 closed rings of map ``(x, y)``; ring[0] == ring[4]. N = 0 gives
        shape (0, 5, 2).
    """
    boxes = as_boxes(boxes_px)
    x_lo = np.minimum(boxes[:, 0], boxes[:, 2])
    x_hi = np.maximum(boxes[:, 0], boxes[:, 2])
    y_lo = np.minimum(boxes[:, 1], boxes[:, 3])
    y_hi = np.maximum(boxes[:, 1], boxes[:, 3])
    det = transform.a * transform.e - transform.b * transform.d
    if det < 0:
        # Clockwise as numbers in pixel space; the flip (e.g. north-up) makes it CCW in map space.
        cols = np.stack([x_lo, x_lo, x_hi, x_hi, x_lo], axis=1)
        rows = np.stack([y_lo, y_hi, y_hi, y_lo, y_lo], axis=1)
    else:
        cols = np.stack([x_lo, x_hi, x_hi, x_lo, x_lo], axis=1)
        rows = np.stack([y_lo, y_lo, y_hi, y_hi, y_lo], axis=1)
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    rings: npt.NDArray[np.float64] = np.stack([xs, ys], axis=-1).astype(np.float64, copy=False)
    return rings.reshape(boxes.shape[0], 5, 2)


def tile_footprint_ring(
    tile: Tile, raster_transform: Affine, valid_only: bool = True
) -> npt.NDArray[np.float64]:
    """Return a tile's footprint as one closed ring in map coordinates.

    Uses the window's pixel CORNERS (outer edges of its edge pixels); counter-clockwise in map
    space, like :func:`boxes_to_rings`. Its bounds equal ``rasterio.windows.bounds`` of the same
    window.

    Args:
        tile: the tile.
        raster_transform: the raster's transform.
        valid_only: True (default) for the part inside the raster (:func:`valid_window`), False
            for the full padded window (:func:`tile_window`).

    Returns:
        (5, 2) float64 closed ring of map ``(x, y)``.
    """
    window = valid_window(tile) if valid_only else tile_window(tile)
    box = np.array(
        [
            [
                window.col_off,
                window.row_off,
                window.col_off + window.width,
                window.row_off + window.height,
            ]
        ],
        dtype=np.float64,
    )
    ring: npt.NDArray[np.float64] = boxes_to_rings(box, raster_transform)[0]
    return ring


def tile_boxes_to_raster_px(boxes_px: npt.ArrayLike, tile: Tile) -> npt.NDArray[np.float64]:
    """Shift boxes from tile pixels to raster pixels.

    Adds ``col_off`` to x and ``row_off`` to y; works for corner and centre coordinates alike, no
    rounding. The input is not changed.

    Args:
        boxes_px: (N, 4) xyxy, TILE pixel coordinates (x = col, y = row).
        tile: the tile the boxes belong to.

    Returns:
        (N, 4) float64 xyxy, RASTER pixel coordinates.
    """
    boxes = as_boxes(boxes_px)
    offset = np.array([tile.col_off, tile.row_off, tile.col_off, tile.row_off], dtype=np.float64)
    shifted: npt.NDArray[np.float64] = boxes + offset
    return shifted


def pixel_size(transform: Affine) -> tuple[float, float]:
    """Return the size of one pixel in map units.

    The length of the transform's column and row vectors, so it is also right for rotated or
    sheared transforms; for north-up rasters it is ``(|a|, |e|)``.

    Args:
        transform: pixel -> map transform.

    Returns:
        ``(x_res, y_res)``: positive map units per pixel along columns (x) and rows (y).
    """
    return math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)


def raster_footprint(height: int, width: int, transform: Affine, points_per_side: int = 1) -> Any:
    """A raster's footprint in its map coordinates: a shapely polygon of its pixel box's corners.

    ``points_per_side`` > 1 densifies the sides first (pixel frame), so that the footprint stays
    true once reprojected to another CRS, where straight sides bend.
    """
    import shapely

    box = shapely.box(0.0, 0.0, float(width), float(height))
    if points_per_side > 1:
        box = shapely.segmentize(box, max(width, height) / points_per_side)
    t = transform
    return shapely.affinity.affine_transform(box, [t.a, t.b, t.d, t.e, t.c, t.f])
