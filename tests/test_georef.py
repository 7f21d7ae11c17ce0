"""mgpr.geo.georef checked against rasterio's own transform helpers."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import rasterio.transform
import rasterio.windows
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpr.geo.georef import (
    boxes_to_rings,
    pixel_size,
    tile_boxes_to_raster_px,
    tile_footprint_ring,
)
from mgpr.geo.tiling import Tile, plan_tiles, tile_window, valid_window

PROPS = settings(max_examples=150, deadline=None)

# rasterio 1.4 itself still uses ``Affine * tuple``, which affine 3 flags as pending deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use `@` matmul instead of `\\*` mul operator:PendingDeprecationWarning"
)

UTM = Affine(0.1, 0.0, 500_000.0, 0.0, -0.1, 5_000_000.0)
NON_SQUARE = Affine(0.3, 0.0, 500_000.0, 0.0, -0.2, 5_000_000.0)
ROTATED = (
    Affine.translation(500_000.0, 5_000_000.0) @ Affine.rotation(30.0) @ Affine.scale(0.3, -0.2)
)
SHEARED = (
    Affine.translation(500_000.0, 5_000_000.0) @ Affine.shear(10.0, 5.0) @ Affine.scale(0.5, -0.5)
)
IDENTITY = Affine.identity()  # what rasterio gives a raster without CRS / geotransform

TRANSFORMS = {
    "utm": UTM,
    "non_square": NON_SQUARE,
    "rotated": ROTATED,
    "sheared": SHEARED,
    "identity": IDENTITY,
}
NON_ROTATED = ["utm", "non_square", "identity"]

# 1001 x 777 raster, 256 px tiles, 32 px overlap: 5 x 4 tiles with padded edges.
TILES = plan_tiles("ortho.tif", 1001, 777, 256, 32)


def _shoelace(ring: npt.NDArray[np.float64]) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _tol(transform: Affine) -> float:
    return 1e-6 * min(pixel_size(transform))


def _expected_corners(
    box: npt.NDArray[np.float64], tile: Tile, transform: Affine
) -> npt.NDArray[np.float64]:
    """The 4 box corners in map coordinates, from rasterio with raster pixel corners ("ul")."""
    x1, y1, x2, y2 = box
    cols = np.array([x1, x1, x2, x2]) + tile.col_off
    rows = np.array([y1, y2, y2, y1]) + tile.row_off
    xs, ys = rasterio.transform.xy(transform, rows, cols, offset="ul")
    return np.stack([np.asarray(xs), np.asarray(ys)], axis=1)


def _same_vertices(
    ring: npt.NDArray[np.float64], expected: npt.NDArray[np.float64], tol: float
) -> bool:
    """Every ring vertex is one expected corner and every corner is used once."""
    dist = np.abs(ring[:4, None, :] - expected[None, :, :]).max(axis=-1)  # (4, 4)
    match = dist <= tol
    return bool(match.any(axis=1).all() and match.any(axis=0).all())


boxes_in_tile = st.tuples(
    st.floats(0, 250), st.floats(0, 250), st.floats(1, 6), st.floats(1, 6)
).map(lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]])


@pytest.mark.parametrize("name", list(TRANSFORMS))
@PROPS
@given(st.lists(boxes_in_tile, min_size=1, max_size=8), st.sampled_from(TILES))
def test_rings_match_rasterio_xy_corners(name: str, boxes: list[list[float]], tile: Tile) -> None:
    transform = TRANSFORMS[name]
    arr = np.array(boxes, dtype=np.float64)
    rings = boxes_to_rings(arr, tile_transform(tile, transform))
    assert rings.shape == (len(boxes), 5, 2) and rings.dtype == np.float64
    for box, ring in zip(arr, rings, strict=True):
        np.testing.assert_array_equal(ring[0], ring[4])
        assert _same_vertices(ring, _expected_corners(box, tile, transform), _tol(transform))
        # Counter-clockwise in map space (GeoPackage exterior ring), whatever the transform.
        assert _shoelace(ring) > 0


def test_north_up_ring_is_ccw_with_expected_order() -> None:
    ring = boxes_to_rings(np.array([[0.0, 0.0, 10.0, 20.0]]), UTM)[0]
    expected = [
        (500_000.0, 5_000_000.0),  # upper-left
        (500_000.0, 4_999_998.0),  # lower-left
        (500_001.0, 4_999_998.0),  # lower-right
        (500_001.0, 5_000_000.0),  # upper-right
        (500_000.0, 5_000_000.0),
    ]
    np.testing.assert_allclose(ring, expected, atol=1e-9)
    assert _shoelace(ring) == pytest.approx(1.0 * 2.0)


def test_reversed_box_coordinates_are_normalised() -> None:
    a = boxes_to_rings(np.array([[10.0, 20.0, 0.0, 0.0]]), UTM)
    b = boxes_to_rings(np.array([[0.0, 0.0, 10.0, 20.0]]), UTM)
    np.testing.assert_array_equal(a, b)


def test_empty_boxes_give_empty_rings() -> None:
    assert boxes_to_rings(np.zeros((0, 4)), UTM).shape == (0, 5, 2)
    assert boxes_to_rings([], UTM).shape == (0, 5, 2)
    assert tile_boxes_to_raster_px(np.zeros((0, 4)), TILES[0]).shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        boxes_to_rings(np.zeros((2, 3)), UTM)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("tile", [TILES[0], TILES[6], TILES[-1]], ids=lambda t: t.id.key())
def test_tile_transform_is_rasterio_window_transform(name: str, tile: Tile) -> None:
    transform = TRANSFORMS[name]
    tt = tile_transform(tile, transform)
    window = rasterio.windows.Window(tile.col_off, tile.row_off, tile.width, tile.height)
    assert tt.almost_equals(rasterio.windows.transform(window, transform))
    x, y = rasterio.transform.xy(transform, tile.row_off, tile.col_off, offset="ul")
    assert (tt.c, tt.f) == pytest.approx((x, y), abs=_tol(transform))


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("valid_only", [True, False])
def test_footprint_bounds_equal_rasterio_window_bounds(name: str, valid_only: bool) -> None:
    transform = TRANSFORMS[name]
    for tile in TILES:
        ring = tile_footprint_ring(tile, transform, valid_only=valid_only)
        assert ring.shape == (5, 2)
        np.testing.assert_array_equal(ring[0], ring[4])
        assert _shoelace(ring) > 0
        window = valid_window(tile) if valid_only else tile_window_of(tile)
        left, bottom, right, top = rasterio.windows.bounds(window, transform)
        # rasterio gives (left, bottom, right, top) as mapped; with y pointing down (identity,
        # no CRS) "bottom" is the larger y, so compare as (minx, miny, maxx, maxy).
        west, south = min(left, right), min(bottom, top)
        east, north = max(left, right), max(bottom, top)
        got = (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max())
        if name in NON_ROTATED:
            assert got == pytest.approx((west, south, east, north), abs=_tol(transform))
        # Exact corners for every transform, rotated included.
        box = np.array([0.0, 0.0, float(window.width), float(window.height)])
        assert _same_vertices(ring, _expected_corners(box, tile, transform), _tol(transform))


def tile_window_of(tile: Tile) -> rasterio.windows.Window:
    """Full padded window built independently of mgpr.geo.tiling.tile_window."""
    return rasterio.windows.Window(tile.col_off, tile.row_off, tile.width, tile.height)


def test_valid_footprint_of_last_tile_ends_at_raster_edge() -> None:
    ring = tile_footprint_ring(TILES[-1], UTM)
    west, south, east, north = rasterio.transform.array_bounds(1001, 777, UTM)
    assert ring[:, 0].max() == pytest.approx(east)
    assert ring[:, 1].min() == pytest.approx(south)
    padded = tile_footprint_ring(TILES[-1], UTM, valid_only=False)
    assert padded[:, 0].max() > east and padded[:, 1].min() < south


@PROPS
@given(st.lists(boxes_in_tile, max_size=8), st.sampled_from(TILES))
def test_tile_boxes_to_raster_px_then_raster_transform_agrees(
    boxes: list[list[float]], tile: Tile
) -> None:
    arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    before = arr.copy()
    raster_px = tile_boxes_to_raster_px(arr, tile)
    np.testing.assert_array_equal(arr, before)  # input unchanged
    np.testing.assert_array_equal(raster_px[:, [0, 2]], arr[:, [0, 2]] + tile.col_off)
    np.testing.assert_array_equal(raster_px[:, [1, 3]], arr[:, [1, 3]] + tile.row_off)
    for transform in (UTM, ROTATED):
        a = boxes_to_rings(raster_px, transform)
        b = boxes_to_rings(arr, tile_transform(tile, transform))
        np.testing.assert_allclose(a, b, rtol=0, atol=_tol(transform))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("utm", (0.1, 0.1)),
        ("non_square", (0.3, 0.2)),
        ("rotated", (0.3, 0.2)),
        ("identity", (1.0, 1.0)),
    ],
)
def test_pixel_size(name: str, expected: tuple[float, float]) -> None:
    assert pixel_size(TRANSFORMS[name]) == pytest.approx(expected)


def test_identity_transform_map_equals_pixel_corners() -> None:
    tile = TILES[5]
    box = np.array([[1.5, 2.0, 4.0, 8.25]])
    ring = boxes_to_rings(tile_boxes_to_raster_px(box, tile), IDENTITY)[0]
    x1, y1, x2, y2 = tile_boxes_to_raster_px(box, tile)[0]
    assert {tuple(p) for p in ring[:4]} == {(x1, y1), (x1, y2), (x2, y2), (x2, y1)}
    assert _shoelace(ring) > 0


def tile_transform(tile: Tile, raster_transform: Affine) -> Affine:
    """Return the affine transform of a tile's (padded) window.

    Derived with :func:`rasterio.windows.transform` from :func:`mgpr.geo.tiling.tile_window`: it
    maps
    TILE pixel corner coordinates ``(col, row)`` to map ``(x, y)``; the padded part extends the
    same grid past the raster.

    Args:
        tile: the tile.
        raster_transform: the raster's transform (raster pixel corners -> map coordinates).

    Returns:
        The tile's transform, same CRS as the raster.
    """
    transform: Affine = rasterio.windows.transform(tile_window(tile), raster_transform)
    return transform
