"""Pure tile geometry: the tile grid of a raster, its windows and seam ownership.

Everything here is in raster PIXELS, rows first like array shapes (``row, col, height, width``);
``tile_size`` and ``overlap`` are pixels too. Nothing here opens a file or imports torch or
Lightning: the functions take the raster's ``height, width`` (``height, width = src.shape``) and
return frozen value objects.

A raster of ``height x width`` pixels is cut into square tiles of ``tile_size`` pixels that overlap
their neighbours by ``overlap`` pixels, so tile ``(r, c)`` starts at ``(r * stride, c * stride)``
with ``stride = tile_size - overlap``. Every tile is exactly ``tile_size`` square; a tile at the
bottom or right edge is *padded* past the raster (its ``valid_height`` / ``valid_width`` say how
much of it lies inside). No tile starts outside the raster, and every pixel lies inside at least one
tile's valid part.

Only :func:`tile_window` and :func:`valid_window` build :class:`rasterio.windows.Window` objects;
they are the one place where our row-first order becomes rasterio's column-first order.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from rasterio.windows import Window

from mgpr.errors import ConfigError

__all__ = [
    "Tile",
    "TileGrid",
    "TileId",
    "box_touches_tile_edge",
    "owner_region",
    "plan_tiles",
    "tile_grid",
    "tile_window",
    "validate_tiling",
    "valid_window",
]

_KEY_SEP = "::"
_KEY_TAIL = re.compile(r"r(\d+)c(\d+)")


@dataclass(frozen=True, slots=True, order=True)
class TileId:
    """Stable identity of one tile: the raster it comes from and its grid position.

    Hashable and ordered (by path, then row, then column), so it can key dicts and resume sets.

    Attributes:
        path: raster path exactly as the user gave it; GDAL paths such as ``/vsicurl/...`` are kept
            untouched (never resolved or normalised).
        row: grid row index, 0-based (not pixels).
        col: grid column index, 0-based (not pixels).
    """

    path: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(
                f"TileId.path must be a str, got {type(self.path).__name__} {self.path!r}; "
                "pass str(path) as the user gave it."
            )
        if self.row < 0 or self.col < 0:
            raise ValueError(
                f"TileId grid indices must be >= 0, got row={self.row}, col={self.col}."
            )

    def key(self) -> str:
        """Return the one stable string form, ``"<path>::r<row>c<col>"``.

        Used in progress files and for resume; :meth:`from_key` is its exact inverse, also for paths
        that contain ``::`` or digits (the grid part is always after the LAST ``::``).
        """
        return f"{self.path}{_KEY_SEP}r{self.row}c{self.col}"

    @classmethod
    def from_key(cls, key: str) -> TileId:
        """Parse a string made by :meth:`key` back into a :class:`TileId`.

        Args:
            key: ``"<path>::r<row>c<col>"``.

        Returns:
            The tile id with ``TileId.from_key(t.key()) == t``.

        Raises:
            ValueError: if ``key`` does not end in ``::r<row>c<col>`` (e.g. a corrupted progress
                file).
        """
        path, sep, tail = key.rpartition(_KEY_SEP)
        match = _KEY_TAIL.fullmatch(tail)
        if not sep or match is None:
            raise ValueError(
                f"Tile key {key!r} is not of the form '<path>::r<row>c<col>'; "
                "delete or repair the progress file that holds it."
            )
        return cls(path=path, row=int(match.group(1)), col=int(match.group(2)))


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile: its id and its pixel window in the raster.

    Attributes:
        id: the tile's stable identity.
        row_off: pixels, first row of the window in the raster.
        col_off: pixels, first column of the window in the raster.
        height: pixels, always ``tile_size`` (edge tiles are padded past the raster).
        width: pixels, always ``tile_size``.
        valid_height: pixels of the window inside the raster (``<= height``).
        valid_width: pixels of the window inside the raster (``<= width``).
    """

    id: TileId
    row_off: int
    col_off: int
    height: int
    width: int
    valid_height: int
    valid_width: int


@dataclass(frozen=True, slots=True)
class TileGrid:
    """Shape of the tile grid of one raster.

    Attributes:
        n_rows: number of tile rows.
        n_cols: number of tile columns.
        tile_size: pixels, side of every (square) tile.
        overlap: pixels shared by neighbouring tiles.
    """

    n_rows: int
    n_cols: int
    tile_size: int
    overlap: int

    @property
    def stride(self) -> int:
        """Pixels between the starts of neighbouring tiles: ``tile_size - overlap``."""
        return self.tile_size - self.overlap

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the grid: ``n_rows * n_cols``."""
        return self.n_rows * self.n_cols


def validate_tiling(tile_size: int, overlap: int) -> None:
    """Check a tile size and overlap before any work.

    Args:
        tile_size: pixels, side of a square tile; must be >= 1.
        overlap: pixels shared by neighbours; must satisfy ``0 <= overlap < tile_size``.

    Raises:
        ConfigError: naming ``tile_size=`` or ``overlap=``, the value seen and the fix.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral):
        raise ConfigError(
            f"tile_size={tile_size!r} is not an integer number of pixels; "
            "set tile_size to an integer such as 512."
        )
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral):
        raise ConfigError(
            f"overlap={overlap!r} is not an integer number of pixels; "
            "set overlap to an integer such as 0 or 64."
        )
    if tile_size < 1:
        raise ConfigError(
            f"tile_size={tile_size} must be at least 1 pixel; set tile_size to a positive "
            "integer such as 512."
        )
    if overlap < 0:
        raise ConfigError(
            f"overlap={overlap} must not be negative; set overlap to 0 or a positive number of "
            "pixels smaller than tile_size."
        )
    if overlap >= tile_size:
        raise ConfigError(
            f"overlap={overlap} must be smaller than tile_size={tile_size}; set overlap to at "
            f"most {tile_size - 1} (e.g. {tile_size // 8}) or raise tile_size."
        )


def _check_raster_shape(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"Raster shape height={height}, width={width} must be at least 1x1 pixel.")


def _n_tiles_1d(size: int, tile_size: int, stride: int) -> int:
    if size <= tile_size:
        return 1
    return math.ceil((size - tile_size) / stride) + 1


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> TileGrid:
    """Compute the tile grid of a ``height x width`` raster.

    Per axis, with ``size`` the raster's height (rows) or width (columns) and
    ``stride = tile_size - overlap``::

        n = 1                                          if size <= tile_size
        n = ceil((size - tile_size) / stride) + 1      otherwise

    ``ceil`` (not floor) keeps the last partial tile, so every pixel is covered; that tile is
    padded past the raster edge (it is still ``tile_size`` square). The last tile starts at
    ``(n - 1) * stride < size - overlap``, so no tile starts outside the raster, and it ends at or
    past ``size``.

    Args:
        height: pixels, raster rows (``height, width = src.shape``).
        width: pixels, raster columns.
        tile_size: pixels, side of every square tile.
        overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile_size``.

    Returns:
        The grid: number of tile rows and columns, tile size and overlap.

    Raises:
        ConfigError: for a bad ``tile_size`` / ``overlap`` (see :func:`validate_tiling`).
        ValueError: if the raster is empty (height or width < 1).
    """
    validate_tiling(tile_size, overlap)
    _check_raster_shape(height, width)
    height, width, tile_size, overlap = int(height), int(width), int(tile_size), int(overlap)
    stride = tile_size - overlap
    return TileGrid(
        n_rows=_n_tiles_1d(height, tile_size, stride),
        n_cols=_n_tiles_1d(width, tile_size, stride),
        tile_size=tile_size,
        overlap=overlap,
    )


def plan_tiles(
    path: str,
    height: int,
    width: int,
    tile_size: int,
    overlap: int,
    keep: npt.NDArray[np.bool_] | None = None,
) -> list[Tile]:
    """List every tile of one raster, row-major (or those ``keep`` selects).

    Tile ``(r, c)`` starts at pixel ``(r * stride, c * stride)`` (``stride = tile_size - overlap``)
    and is ``tile_size`` square; its valid part is ``min(tile_size, size - offset)`` per axis. The
    tile count follows :func:`tile_grid`. Same inputs give equal lists (the ids are stable).

    Args:
        path: raster path exactly as the user gave it (stored in each :class:`TileId`).
        height: pixels, raster rows.
        width: pixels, raster columns.
        tile_size: pixels, side of every square tile.
        overlap: pixels shared by neighbouring tiles.
        keep: optional ``(n_rows, n_cols)`` bool grid: only the tiles where it is True are
            listed (``aoi=``, :func:`mgpr.geo.aoi.tiles_in_aoi`), in the same order; the others
            are never built.

    Returns:
        ``n_rows * n_cols`` tiles in row-major order (row 0 left to right, then row 1, ...).

    Raises:
        ConfigError: for a bad ``tile_size`` / ``overlap``.
        ValueError: if the raster is empty.
    """
    grid = tile_grid(height, width, tile_size, overlap)
    height, width, tile_size = int(height), int(width), grid.tile_size
    stride = grid.stride
    if keep is not None and keep.shape != (grid.n_rows, grid.n_cols):
        raise ValueError(f"keep has shape {keep.shape}, the grid {grid.n_rows}x{grid.n_cols}")
    tiles: list[Tile] = []
    for r in range(grid.n_rows):
        row_off = r * stride
        valid_height = min(tile_size, height - row_off)
        cols = range(grid.n_cols) if keep is None else np.flatnonzero(keep[r]).tolist()
        for c in cols:
            col_off = c * stride
            tiles.append(
                Tile(
                    id=TileId(path=path, row=r, col=c),
                    row_off=row_off,
                    col_off=col_off,
                    height=tile_size,
                    width=tile_size,
                    valid_height=valid_height,
                    valid_width=min(tile_size, width - col_off),
                )
            )
    return tiles


def tile_window(tile: Tile) -> Window:
    """Return the full, padded window of a tile (it may extend past the raster's bottom/right).

    Read it with ``boundless=True`` (or read :func:`valid_window` and pad). This and
    :func:`valid_window` are the only places where row-first becomes rasterio's column-first
    ``Window(col_off, row_off, width, height)``.

    Args:
        tile: the tile.

    Returns:
        ``Window(col_off, row_off, width, height)`` in raster pixels.
    """
    return Window(col_off=tile.col_off, row_off=tile.row_off, width=tile.width, height=tile.height)


def valid_window(tile: Tile) -> Window:
    """Return the part of a tile's window that lies inside the raster.

    Args:
        tile: the tile.

    Returns:
        ``Window(col_off, row_off, valid_width, valid_height)`` in raster pixels.
    """
    return Window(
        col_off=tile.col_off,
        row_off=tile.row_off,
        width=tile.valid_width,
        height=tile.valid_height,
    )


def _owner_span(index: int, n: int, stride: int, overlap: int, size: int) -> tuple[int, int]:
    start = 0 if index == 0 else index * stride + overlap // 2
    stop = size if index == n - 1 else (index + 1) * stride + overlap // 2
    return start, stop


def owner_region(tile: Tile, grid: TileGrid, height: int, width: int) -> tuple[int, int, int, int]:
    """Return the raster pixels this tile owns when overlapping tiles are de-duplicated.

    Ownership splits each overlap at its middle. Per axis, with ``stride`` and ``overlap`` from
    ``grid`` and ``n`` tiles, the boundary between tile ``i - 1`` and tile ``i`` is
    ``b_i = i * stride + overlap // 2`` (``b_0 = 0``, ``b_n = size``), and tile ``i`` owns the
    half-open span ``[b_i, b_{i+1})``. The first tile owns from 0 and the last to the raster edge,
    so the owner regions of all tiles partition the raster exactly, and each lies inside its
    tile's valid window. Segmentation's ``seam=crop`` writes each pixel from the tile that owns it
    (:mod:`mgpr.geo.seams`).

    Args:
        tile: a tile planned with the same grid and raster shape.
        grid: the raster's grid (:func:`tile_grid`).
        height: pixels, raster rows.
        width: pixels, raster columns.

    Returns:
        ``(row_min, col_min, row_max, col_max)`` in raster pixels, half-open (max excluded).

    Raises:
        ValueError: if the tile's grid position is outside ``grid``.
    """
    r, c = tile.id.row, tile.id.col
    if r >= grid.n_rows or c >= grid.n_cols:
        raise ValueError(
            f"Tile {tile.id.key()!r} lies outside the grid of {grid.n_rows}x{grid.n_cols} tiles; "
            "plan tiles and grid from the same raster shape and tiling."
        )
    row_min, row_max = _owner_span(r, grid.n_rows, grid.stride, grid.overlap, height)
    col_min, col_max = _owner_span(c, grid.n_cols, grid.stride, grid.overlap, width)
    return row_min, col_min, row_max, col_max


def as_boxes(boxes_px: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Boxes as a float64 ``(N, 4)`` xyxy array; raises ValueError for another shape."""
    boxes = np.asarray(boxes_px, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"Boxes must have shape (N, 4) xyxy, got shape {boxes.shape}.")
    return boxes


def box_touches_tile_edge(
    boxes_px: npt.ArrayLike,
    tile: Tile,
    margin_px: float = 1.0,
    *,
    raster_height: int | None = None,
    raster_width: int | None = None,
) -> npt.NDArray[np.bool_]:
    """Say which boxes lie within ``margin_px`` of an inner tile edge (the object may be cut).

    An inner edge is a tile edge that is not the raster border. The top/left edges are inner when
    ``row_off`` / ``col_off > 0``. The bottom/right edges sit at ``valid_height`` /
    ``valid_width``; they are the raster border when the tile is padded there
    (``valid_* < height/width``) or, if ``raster_height`` / ``raster_width`` are given, when the
    tile ends exactly at the raster edge. Without those, a tile that ends exactly at the raster
    edge (unpadded) counts that edge as inner (conservative).

    A box touches the left edge when ``x1 <= margin_px``, the right edge when
    ``x2 >= valid_width - margin_px`` (same for rows); comparisons are inclusive, no rounding.

    Args:
        boxes_px: (N, 4) xyxy, TILE pixel corner coordinates (x = column, y = row).
        tile: the tile the boxes were predicted on.
        margin_px: pixels, distance from an edge still counted as touching.
        raster_height: pixels, raster rows; optional, makes exact-fit bottom tiles exact.
        raster_width: pixels, raster columns; optional, makes exact-fit right tiles exact.

    Returns:
        (N,) bool, True where the box is within the margin of an inner edge.
    """
    boxes = as_boxes(boxes_px)
    touches = np.zeros(boxes.shape[0], dtype=np.bool_)
    if tile.col_off > 0:
        touches |= boxes[:, 0] <= margin_px
    if tile.row_off > 0:
        touches |= boxes[:, 1] <= margin_px
    right_is_border = tile.valid_width < tile.width or (
        raster_width is not None and tile.col_off + tile.valid_width >= raster_width
    )
    bottom_is_border = tile.valid_height < tile.height or (
        raster_height is not None and tile.row_off + tile.valid_height >= raster_height
    )
    if not right_is_border:
        touches |= boxes[:, 2] >= tile.valid_width - margin_px
    if not bottom_is_border:
        touches |= boxes[:, 3] >= tile.valid_height - margin_px
    return touches
