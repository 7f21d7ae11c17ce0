"""Dense seams: owned cores partition the raster, cosine blend weights sum to one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mgpr.errors import ConfigError
from mgpr.geo.seams import blend_weights, core_runs, ramp
from mgpr.geo.tiling import owner_region, plan_tiles, tile_grid


@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    tile_size=st.integers(8, 96),
    overlap_frac=st.floats(0.0, 0.5),
)
def test_blend_weights_are_a_partition_of_unity(
    height: int, width: int, tile_size: int, overlap_frac: float
) -> None:
    overlap = int(tile_size * overlap_frac)
    grid = tile_grid(height, width, tile_size, overlap)
    total = np.zeros((height, width))
    for tile in plan_tiles("r.tif", height, width, tile_size, overlap):
        w = blend_weights(tile, grid)
        assert w.shape == (tile_size, tile_size) and (w >= 0).all() and (w <= 1).all()
        total[
            tile.row_off : tile.row_off + tile.valid_height,
            tile.col_off : tile.col_off + tile.valid_width,
        ] += w[: tile.valid_height, : tile.valid_width]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_ramp_is_a_smooth_half_hann() -> None:
    r = ramp(8)
    assert (np.diff(r) > 0).all() and 0 < r[0] < 0.05 and 0.95 < r[-1] < 1
    np.testing.assert_allclose(r + r[::-1], 1.0)


def test_blend_refuses_overlap_above_half_a_tile() -> None:
    grid = tile_grid(100, 100, 32, 17)
    tile = plan_tiles("r.tif", 100, 100, 32, 17)[0]
    with pytest.raises(ConfigError, match="overlap <= tile_size / 2"):
        blend_weights(tile, grid)


@given(
    height=st.integers(1, 200),
    width=st.integers(1, 200),
    tile_size=st.integers(4, 64),
    overlap=st.integers(0, 3),
    keep=st.lists(st.booleans(), min_size=1, max_size=60),
)
def test_core_runs_are_rectangles_of_their_cores(
    height: int, width: int, tile_size: int, overlap: int, keep: list[bool]
) -> None:
    grid = tile_grid(height, width, tile_size, overlap)
    tiles = plan_tiles("r.tif", height, width, tile_size, overlap)
    chosen = [t for i, t in enumerate(tiles) if keep[i % len(keep)]]
    cover = np.zeros((height, width), np.int32)
    for run in core_runs(reversed(chosen), grid, height, width):
        assert len({t.id.row for t in run.tiles}) == 1
        painted = np.zeros((height, width), bool)
        for tile in run.tiles:
            r0, c0, r1, c1 = owner_region(tile, grid, height, width)
            painted[r0:r1, c0:c1] = True
        assert painted.sum() == run.height * run.width
        assert painted[run.row_min : run.row_max, run.col_min : run.col_max].all()
        cover += painted
    assert cover.max() <= 1
    assert cover.sum() == sum(
        (r1 - r0) * (c1 - c0)
        for r0, c0, r1, c1 in (owner_region(t, grid, height, width) for t in chosen)
    )
