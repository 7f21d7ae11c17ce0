"""Properties of the pure tile geometry in mgpr.geo.tiling."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from mgpr.errors import ConfigError
from mgpr.geo.tiling import (
    Tile,
    TileGrid,
    TileId,
    as_boxes,
    box_touches_tile_edge,
    owner_region,
    plan_tiles,
    tile_grid,
    tile_window,
    valid_window,
    validate_tiling,
)

PROPS = settings(max_examples=150, deadline=None)


@st.composite
def tilings(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(height, width, tile_size, overlap) with at most ~14 tiles per axis (keeps tests fast)."""
    tile_size = draw(st.integers(1, 64))
    stride = draw(st.integers(1, tile_size))
    overlap = tile_size - stride
    max_size = tile_size + 13 * stride
    height = draw(st.integers(1, max_size))
    width = draw(st.integers(1, max_size))
    return height, width, tile_size, overlap


def _formula(size: int, tile_size: int, overlap: int) -> int:
    return 1 if size <= tile_size else math.ceil((size - tile_size) / (tile_size - overlap)) + 1


def _brute_count(size: int, tile_size: int, overlap: int) -> int:
    """Fewest tiles, starting at multiples of the stride, whose last one reaches the edge."""
    n = 1
    while (n - 1) * (tile_size - overlap) + tile_size < size:
        n += 1
    return n


# --- counts and coverage -------------------------------------------------------------------------


@PROPS
@given(tilings())
def test_counts_match_formula(t: tuple[int, int, int, int]) -> None:
    height, width, tile_size, overlap = t
    grid = tile_grid(height, width, tile_size, overlap)
    assert grid == TileGrid(
        n_rows=_formula(height, tile_size, overlap),
        n_cols=_formula(width, tile_size, overlap),
        tile_size=tile_size,
        overlap=overlap,
    )
    assert grid.n_rows == _brute_count(height, tile_size, overlap)
    assert grid.n_cols == _brute_count(width, tile_size, overlap)
    assert grid.stride == tile_size - overlap
    assert len(plan_tiles("a.tif", height, width, tile_size, overlap)) == grid.n_tiles


@PROPS
@given(tilings())
def test_tiles_cover_every_pixel_and_stay_in_padded_raster(t: tuple[int, int, int, int]) -> None:
    height, width, tile_size, overlap = t
    grid = tile_grid(height, width, tile_size, overlap)
    tiles = plan_tiles("a.tif", height, width, tile_size, overlap)
    covered = np.zeros((height, width), dtype=np.int32)
    for tile in tiles:
        # No tile starts outside the raster; every tile is tile_size square (padded at edges).
        assert 0 <= tile.row_off < height and 0 <= tile.col_off < width
        assert tile.height == tile.width == tile_size
        assert tile.row_off == tile.id.row * grid.stride
        assert tile.col_off == tile.id.col * grid.stride
        assert tile.valid_height == min(tile_size, height - tile.row_off) >= 1
        assert tile.valid_width == min(tile_size, width - tile.col_off) >= 1
        w = valid_window(tile)
        covered[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
        # The padded part only ever extends past the bottom/right border, by less than a tile.
        assert tile.row_off + tile.height < height + tile_size
        assert tile.col_off + tile.width < width + tile_size
    assert covered.min() >= 1
    # Valid windows cover exactly [0, size) on each axis.
    assert min(t.row_off for t in tiles) == 0 and min(t.col_off for t in tiles) == 0
    assert max(t.row_off + t.valid_height for t in tiles) == height
    assert max(t.col_off + t.valid_width for t in tiles) == width
    # Full windows reach the edge (padding only where needed).
    assert max(t.row_off + t.height for t in tiles) >= height
    assert max(t.col_off + t.width for t in tiles) >= width


@PROPS
@given(tilings())
def test_row_major_unique_stable_ids(t: tuple[int, int, int, int]) -> None:
    height, width, tile_size, overlap = t
    tiles = plan_tiles("a.tif", height, width, tile_size, overlap)
    ids = [tile.id for tile in tiles]
    assert ids == sorted(ids)  # row-major == (row, col) order for one path
    assert len(set(ids)) == len(ids)
    assert len({tile.id.key() for tile in tiles}) == len(ids)
    assert plan_tiles("a.tif", height, width, tile_size, overlap) == tiles


@pytest.mark.parametrize(
    ("height", "width", "tile_size"), [(1, 1, 1), (1, 1, 512), (10, 3, 256), (255, 256, 256)]
)
def test_raster_smaller_than_a_tile_gives_one_padded_tile(
    height: int, width: int, tile_size: int
) -> None:
    tiles = plan_tiles("small.tif", height, width, tile_size, 0)
    assert tiles == [
        Tile(
            id=TileId("small.tif", 0, 0),
            row_off=0,
            col_off=0,
            height=tile_size,
            width=tile_size,
            valid_height=height,
            valid_width=width,
        )
    ]


def test_odd_size_with_overlap_exact_plan() -> None:
    # stride 224; rows: ceil((1001 - 256) / 224) + 1 = 5, cols: ceil((777 - 256) / 224) + 1 = 4.
    tiles = plan_tiles("odd.tif", 1001, 777, 256, 32)
    assert tile_grid(1001, 777, 256, 32) == TileGrid(5, 4, 256, 32)
    assert len(tiles) == 20
    assert [t.row_off for t in tiles[::4]] == [0, 224, 448, 672, 896]
    assert [t.col_off for t in tiles[:4]] == [0, 224, 448, 672]
    last = tiles[-1]
    assert last.id == TileId("odd.tif", 4, 3)
    assert (last.valid_height, last.valid_width) == (1001 - 896, 777 - 672)
    assert (last.height, last.width) == (256, 256)


def test_numpy_integers_are_accepted() -> None:
    n = np.int64
    tiles = plan_tiles("a.tif", n(300), n(200), n(128), n(16))  # type: ignore[arg-type]
    assert all(type(v) is int for t in tiles for v in (t.row_off, t.col_off, t.valid_height))


def test_empty_raster_is_refused() -> None:
    with pytest.raises(ValueError, match="height=0"):
        tile_grid(0, 10, 4, 0)


# --- windows -------------------------------------------------------------------------------------


def test_windows_turn_row_first_into_col_first() -> None:
    tile = Tile(TileId("a.tif", 1, 2), row_off=10, col_off=20, height=8, width=8,
                valid_height=5, valid_width=3)  # fmt: skip
    assert tile_window(tile) == Window(col_off=20, row_off=10, width=8, height=8)
    assert valid_window(tile) == Window(col_off=20, row_off=10, width=3, height=5)


# --- ids -----------------------------------------------------------------------------------------

WEIRD_PATHS = [
    "a.tif",
    "",
    "/vsicurl/https://example.com/x.tif?a=1::b",
    "s3::bucket::r1c2",
    "dir/r12c34.tif",
    "C:\\data\\ortho 2024.tif",
    "x::r1c2::r3c4",
    "ünïcödé/ортофото.tif",
    "line\nbreak.tif",
    "::",
]


@pytest.mark.parametrize("path", WEIRD_PATHS)
def test_key_round_trip_weird_paths(path: str) -> None:
    tid = TileId(path, 12, 3)
    assert tid.key() == f"{path}::r12c3"
    assert TileId.from_key(tid.key()) == tid


@PROPS
@given(st.text(), st.integers(0, 10**6), st.integers(0, 10**6))
def test_key_round_trip_any_path(path: str, row: int, col: int) -> None:
    tid = TileId(path, row, col)
    assert TileId.from_key(tid.key()) == tid


@pytest.mark.parametrize("key", ["a.tif", "a.tif::", "a.tif::r1", "a.tif::r-1c2", "a.tif:r1c2"])
def test_from_key_rejects_malformed(key: str) -> None:
    with pytest.raises(ValueError, match="r<row>c<col>"):
        TileId.from_key(key)


def test_tile_id_is_hashable_ordered_and_checked() -> None:
    a, b = TileId("a.tif", 0, 1), TileId("a.tif", 1, 0)
    assert a < b and {a: 1}[TileId("a.tif", 0, 1)] == 1
    with pytest.raises(TypeError, match="str"):
        TileId(Path("a.tif"), 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TileId("a.tif", -1, 0)


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tile_size", "overlap", "needle"),
    [
        (0, 0, "tile_size=0"),
        (-5, 0, "tile_size=-5"),
        (256, -1, "overlap=-1"),
        (256, 256, "overlap=256"),
        (256, 300, "overlap=300"),
        (256.0, 0, "tile_size=256.0"),
        (256, 1.5, "overlap=1.5"),
        (True, 0, "tile_size=True"),
    ],
)
def test_validate_tiling_errors(tile_size: int, overlap: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        validate_tiling(tile_size, overlap)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=needle):
        plan_tiles("a.tif", 100, 100, tile_size, overlap)


def test_validate_tiling_accepts_edges() -> None:
    validate_tiling(1, 0)
    validate_tiling(256, 255)


# --- ownership -----------------------------------------------------------------------------------


@PROPS
@given(tilings())
def test_owner_regions_partition_the_raster(t: tuple[int, int, int, int]) -> None:
    height, width, tile_size, overlap = t
    grid = tile_grid(height, width, tile_size, overlap)
    owned = np.zeros((height, width), dtype=np.int32)
    for tile in plan_tiles("a.tif", height, width, tile_size, overlap):
        r0, c0, r1, c1 = owner_region(tile, grid, height, width)
        assert r0 < r1 and c0 < c1
        # Inside the tile's valid window.
        assert tile.row_off <= r0 and r1 <= tile.row_off + tile.valid_height
        assert tile.col_off <= c0 and c1 <= tile.col_off + tile.valid_width
        owned[r0:r1, c0:c1] += 1
    assert (owned == 1).all()


@PROPS
@given(tilings(), st.data())
def test_every_box_centre_owned_by_exactly_one_tile(
    t: tuple[int, int, int, int], data: st.DataObject
) -> None:
    height, width, tile_size, overlap = t
    grid = tile_grid(height, width, tile_size, overlap)
    cy = data.draw(st.floats(0, height, exclude_max=True))
    cx = data.draw(st.floats(0, width, exclude_max=True))
    half = data.draw(st.floats(0, 3))
    owners = 0
    for tile in plan_tiles("a.tif", height, width, tile_size, overlap):
        x, y = cx - tile.col_off, cy - tile.row_off
        box = np.array([[x - half, y - half, x + half, y + half]])
        owners += int(boxes_owned_by_tile(box, tile, grid, height, width)[0])
    assert owners == 1


def test_owner_region_rejects_tile_outside_grid() -> None:
    grid = tile_grid(100, 100, 64, 0)
    tile = plan_tiles("a.tif", 300, 300, 64, 0)[-1]
    with pytest.raises(ValueError, match="outside the grid"):
        owner_region(tile, grid, 100, 100)


# --- edge touching -------------------------------------------------------------------------------


def test_box_touches_inner_edges_only() -> None:
    # 300 x 250 raster, 128 tiles, no overlap: 3 x 2 tiles; tile (1, 0) is left-border, inner top,
    # inner bottom, inner right; tile (2, 1) is padded at bottom (44 rows) and right (122 cols).
    tiles = {t.id: t for t in plan_tiles("a.tif", 300, 250, 128, 0)}
    boxes = np.array(
        [
            [0.0, 50.0, 10.0, 60.0],  # touches left
            [50.0, 0.5, 60.0, 10.0],  # touches top
            [50.0, 50.0, 127.5, 60.0],  # touches right
            [50.0, 50.0, 60.0, 128.0],  # touches bottom
            [50.0, 50.0, 60.0, 60.0],  # interior
        ]
    )
    middle_left = tiles[TileId("a.tif", 1, 0)]
    assert box_touches_tile_edge(boxes, middle_left).tolist() == [False, True, True, True, False]
    corner = tiles[TileId("a.tif", 2, 1)]
    assert (corner.valid_height, corner.valid_width) == (44, 122)
    at_valid_edge = np.array([[100.0, 20.0, 122.0, 30.0], [10.0, 20.0, 20.0, 44.0]])
    assert box_touches_tile_edge(at_valid_edge, corner).tolist() == [False, False]
    assert box_touches_tile_edge(boxes[:2], corner).tolist() == [True, True]
    assert box_touches_tile_edge(boxes[:2], corner, margin_px=0.0).tolist() == [True, False]


def test_box_touches_exact_fit_border_needs_raster_shape() -> None:
    tile = plan_tiles("a.tif", 256, 256, 128, 0)[-1]  # ends exactly at the raster corner
    box = np.array([[100.0, 100.0, 128.0, 128.0]])
    assert box_touches_tile_edge(box, tile).tolist() == [True]  # conservative
    touches = box_touches_tile_edge(box, tile, raster_height=256, raster_width=256)
    assert touches.tolist() == [False]


def test_box_functions_accept_empty_input() -> None:
    tile = plan_tiles("a.tif", 256, 256, 128, 0)[0]
    grid = tile_grid(256, 256, 128, 0)
    assert box_touches_tile_edge(np.zeros((0, 4)), tile).shape == (0,)
    assert boxes_owned_by_tile(np.zeros((0, 4)), tile, grid, 256, 256).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        box_touches_tile_edge(np.zeros((3, 5)), tile)


# --- import hygiene ------------------------------------------------------------------------------


def test_geometry_modules_import_no_heavy_stack() -> None:
    code = (
        "import sys, mgpr.geo.tiling, mgpr.geo.georef\n"
        "bad = [m for m in ('torch', 'lightning', 'typer', 'shapely') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def boxes_owned_by_tile(
    boxes_px: npt.ArrayLike, tile: Tile, grid: TileGrid, height: int, width: int
) -> npt.NDArray[np.bool_]:
    """Say which boxes this tile owns, by the centre point of each box (seam de-duplication).

    A box's centre ``((x1 + x2) / 2, (y1 + y2) / 2)`` is shifted to raster pixels (plus
    ``col_off`` / ``row_off``) and tested against :func:`owner_region`, half-open: a centre exactly
    on a boundary belongs to the later tile (no rounding). Across all tiles every point of the
    raster has exactly one owner, so each object seen whole by two overlapping tiles is kept once.

    Args:
        boxes_px: (N, 4) xyxy, TILE pixel corner coordinates (x = column, y = row).
        tile: the tile the boxes were predicted on.
        grid: the raster's grid.
        height: pixels, raster rows.
        width: pixels, raster columns.

    Returns:
        (N,) bool, True where the tile owns the box's centre.
    """
    boxes = as_boxes(boxes_px)
    row_min, col_min, row_max, col_max = owner_region(tile, grid, height, width)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0 + tile.col_off
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0 + tile.row_off
    owned: npt.NDArray[np.bool_] = (
        (cx >= col_min) & (cx < col_max) & (cy >= row_min) & (cy < row_max)
    )
    return owned
