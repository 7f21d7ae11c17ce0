"""Pixel seams of a dense (per-pixel) result: owned cores and cosine blend weights.

Pure geometry in raster PIXELS, rows first, like :mod:`mgpr.geo.tiling`; no IO, no torch.

``seam=crop``: every raster pixel is taken from exactly one tile, the one whose *core*
(:func:`mgpr.geo.tiling.owner_region`: the tile minus half the overlap on each interior side; edge
tiles own up to the raster edge) holds it. :func:`core_runs` groups the cores of tiles that are
neighbours in one tile row into rectangles, so a part raster holds one rectangle per run.

``seam=blend``: each tile's probabilities are weighted by :func:`blend_weights`, a separable
cosine (half-Hann) ramp across every interior overlap and 1 elsewhere, so that the weights of all
tiles covering a pixel sum to exactly 1 (a partition of unity: across an overlap ``u`` pixels in,
``cos^2 + sin^2 = 1``); the blended probability is the plain sum of the weighted tiles. This
needs ``2 * overlap <= tile_size`` (the two ramps of one tile must not meet).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mgpr.errors import ConfigError
from mgpr.geo.tiling import Tile, TileGrid, owner_region

__all__ = ["CoreRun", "blend_weights", "core_runs", "ramp", "validate_blend"]


@dataclass(frozen=True, slots=True)
class CoreRun:
    """Cores of neighbouring tiles of one tile row: one rectangle of raster pixels.

    Attributes:
        tiles: the tiles, left to right.
        row_min: first raster row, pixels.
        col_min: first raster column, pixels.
        row_max: row after the last, pixels (half-open).
        col_max: column after the last, pixels (half-open).
    """

    tiles: tuple[Tile, ...]
    row_min: int
    col_min: int
    row_max: int
    col_max: int

    @property
    def height(self) -> int:
        """Rows of the rectangle."""
        return self.row_max - self.row_min

    @property
    def width(self) -> int:
        """Columns of the rectangle."""
        return self.col_max - self.col_min


def core_runs(tiles: Iterable[Tile], grid: TileGrid, height: int, width: int) -> list[CoreRun]:
    """Group tiles of one raster into runs of horizontally adjacent tiles (same tile row).

    Cores of tiles ``(r, c)`` and ``(r, c + 1)`` share an edge, so a run's cores tile one
    rectangle exactly. The runs come out in (row, col) order.

    Args:
        tiles: tiles of ONE raster planned with ``grid`` (any order, no repeats).
        grid: the raster's tile grid.
        height: pixels, raster rows.
        width: pixels, raster columns.
    """
    ordered = sorted(tiles, key=lambda t: (t.id.row, t.id.col))
    runs: list[list[Tile]] = []
    for tile in ordered:
        last = runs[-1][-1] if runs else None
        if last is not None and last.id.row == tile.id.row and last.id.col + 1 == tile.id.col:
            runs[-1].append(tile)
        else:
            runs.append([tile])
    out = []
    for run in runs:
        r0, c0, r1, _ = owner_region(run[0], grid, height, width)
        _, _, _, c1 = owner_region(run[-1], grid, height, width)
        out.append(CoreRun(tuple(run), r0, c0, r1, c1))
    return out


def validate_blend(tile_size: int, overlap: int) -> None:
    """Refuse ``seam=blend`` tilings whose cosine ramps would overlap.

    Raises:
        ConfigError: ``2 * overlap > tile_size``.
    """
    if 2 * overlap > tile_size:
        raise ConfigError(
            f"seam=blend needs overlap <= tile_size / 2, got overlap={overlap} with "
            f"tile_size={tile_size}; set overlap={tile_size // 4} or use seam=crop."
        )


def ramp(overlap: int) -> npt.NDArray[np.float64]:
    """Rising weights across an overlap of ``overlap`` pixels: ``sin^2(pi/2 * (u + 0.5) / o)``.

    Pixel centres ``u + 0.5``; the mirrored ramp is ``1 - ramp``, so two tiles sum to 1.
    """
    u = (np.arange(overlap, dtype=np.float64) + 0.5) / max(overlap, 1)
    return np.sin(0.5 * math.pi * u) ** 2


def _axis_weights(index: int, n: int, tile_size: int, overlap: int) -> npt.NDArray[np.float64]:
    w = np.ones(tile_size, dtype=np.float64)
    if overlap == 0:
        return w
    up = ramp(overlap)
    if index > 0:  # interior side towards the previous tile
        w[:overlap] = up
    if index < n - 1:  # interior side towards the next tile
        w[tile_size - overlap :] *= 1.0 - up
    return w


def blend_weights(tile: Tile, grid: TileGrid) -> npt.NDArray[np.float32]:
    """Weights ``(tile_size, tile_size)`` of one tile for ``seam=blend`` (outer product per axis).

    Sides on the raster border keep weight 1 (nothing to blend with). Summed over every tile of
    the grid the weights are 1 at every raster pixel (see the module docstring).

    Raises:
        ConfigError: ``2 * overlap > tile_size``.
    """
    validate_blend(grid.tile_size, grid.overlap)
    rows = _axis_weights(tile.id.row, grid.n_rows, grid.tile_size, grid.overlap)
    cols = _axis_weights(tile.id.col, grid.n_cols, grid.tile_size, grid.overlap)
    return np.outer(rows, cols).astype(np.float32)
