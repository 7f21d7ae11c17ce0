"""Start-up warnings about the inputs: results in pixel coordinates, tiles of padding, seams.

A raster without a CRS (a PNG chip) or georeferenced by GCPs only gets its results in pixel
coordinates; each is named (a few), then counted.

A tile is always ``tile_size`` square; a raster smaller than one (an image chip) is one tile
padded with zeros past its edge. For a folder of 64 px chips under the default ``tile_size=512``
that is 98 % padding: the network runs 64x the pixels it needs, and a classifier or embedder
describes a small image in a corner of a black one. Nothing is wrong enough to refuse (a
detector finds the same objects), so rank 0 says it once, with the tile size that fits.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile

log = logging.getLogger("mgpr")

#: Padding share of the planned tiles' pixels from which the run warns.
PADDING_WARN_SHARE = 0.5
#: A suggested tile size is rounded up to this many pixels (the stride of common backbones).
TILE_STEP = 32


def padding_warning(
    rasters: Sequence[RasterInfo], tiles: Sequence[Tile], tile_size: int
) -> str | None:
    """One line when most of the planned tiles' pixels are padding past the rasters' edges.

    Args:
        rasters: the inputs, on their model grids (pixels of the grid the tiles are cut from).
        tiles: the planned tiles (an ``aoi`` leaves out those outside it).
        tile_size: the tiles' side, pixels.

    Returns:
        The warning, or None when at most :data:`PADDING_WARN_SHARE` of the pixels are padding.
    """
    if not tiles:
        return None
    valid = sum(t.valid_height * t.valid_width for t in tiles)
    share = 1.0 - valid / (len(tiles) * tile_size * tile_size)
    if share <= PADDING_WARN_SHARE:
        return None
    planned = {t.id.path for t in tiles}
    small = [r for r in rasters if r.path in planned and max(r.height, r.width) < tile_size]
    largest = max((r for r in rasters if r.path in planned), key=lambda r: max(r.height, r.width))
    side = max(largest.height, largest.width)
    grid = " on its gsd model grid" if (largest.factor_x, largest.factor_y) != (1.0, 1.0) else ""
    fit = TILE_STEP * math.ceil(side / TILE_STEP)
    size = f"{largest.width} x {largest.height} px"  # width x height, as GDAL and QGIS say
    if fit < tile_size:
        advice = f"set tile_size={fit} to predict each input in one tile of about its size"
    else:  # inputs larger than a tile, or thinner: the smaller tile with the least padding
        shapes = [(r.height, r.width) for r in rasters if r.path in planned]
        best = smaller_tile_size(shapes, tile_size, share)
        advice = (
            f"set tile_size={best[0]} (about {100 * best[1]:.0f}% padding, edge tiles counted "
            f"without overlap) or choose another that fits the inputs (the largest is {size})"
            if best is not None
            else _no_better_tile(rasters, planned)
        )
    return (
        f"{100 * share:.0f}% of the planned tiles' pixels are zero padding past the inputs' "
        f"edges ({len(small)} of {len(planned)} input(s) are smaller than tile_size={tile_size}; "
        f"the largest is {size}{grid}): the model runs "
        f"{1 / (1 - share):.1f}x the pixels it needs and a classifier or embedder sees mostly "
        f"padding; {advice}"
    )


def _no_better_tile(rasters: Sequence[RasterInfo], planned: set[str]) -> str:
    """The advice when no smaller square tile pads clearly less: inputs thinner than any tile.

    A 1 px high strip pads every square tile; naming a size would be a guess that helps nothing.
    """
    thinnest = min((r for r in rasters if r.path in planned), key=lambda r: min(r.height, r.width))
    return (
        f"no smaller tile_size pads clearly less, since the inputs are thinner than tiles "
        f"(the thinnest is {thinnest.width} x {thinnest.height} px): the padding costs compute, "
        "not correctness"
    )


def smaller_tile_size(
    shapes: Sequence[tuple[int, int]], tile_size: int, share: float
) -> tuple[int, float] | None:
    """The smaller tile size to suggest, with its padding share, or None.

    Sizes are multiples of :data:`TILE_STEP` below ``tile_size``; None when none has clearly
    less padding than ``share``. The largest size whose padding is at most half the warning's
    share, else the one with the least padding if that is under two thirds of ``share`` (a
    strip 40 px wide pads any tile).
    Tiles are counted as ``ceil(h / t) * ceil(w / t)`` per raster, without overlap: a guide.
    """
    valid = sum(h * w for h, w in shapes)
    shares: dict[int, float] = {}
    for t in range(TILE_STEP, tile_size, TILE_STEP):
        cut = sum(math.ceil(h / t) * math.ceil(w / t) for h, w in shapes) * t * t
        shares[t] = 1.0 - valid / cut
    low = [t for t, s in shares.items() if s <= PADDING_WARN_SHARE / 2]
    if low:
        return max(low), shares[max(low)]
    if not shares:
        return None
    least = min(shares, key=lambda t: (shares[t], -t))
    return (least, shares[least]) if shares[least] < share * 2 / 3 else None


def has_seams(tiles: Sequence[Tile]) -> bool:
    """Whether any raster has more than one tile (a seam between tiles can cut an object)."""
    counts = Counter(t.id.path for t in tiles)
    return any(n > 1 for n in counts.values())


#: Per-input lines (no CRS, a gsd model grid) given for this many inputs; then one counts the rest.
INPUTS_NAMED = 3


def log_a_few(level: int, lines: Sequence[str], more: str) -> None:
    """Log the first :data:`INPUTS_NAMED` of one kind of per-input line, then one for the rest.

    The last reads ``... and {n} more {more}`` (a folder of 20,000 chips printed 20,000 lines).
    """
    for line in lines[:INPUTS_NAMED]:
        log.log(level, "%s", line)
    if len(lines) > INPUTS_NAMED:
        log.log(level, "... and %d more %s", len(lines) - INPUTS_NAMED, more)


def log_notes(notes: Sequence[tuple[str, str]], more: str, level: int = logging.INFO) -> None:
    """Log ``(kind, line)`` notes a few of each kind (:func:`log_a_few`), kinds in first order."""
    kinds: dict[str, list[str]] = {}
    for kind, line in notes:
        kinds.setdefault(kind, []).append(line)
    for lines in kinds.values():
        log_a_few(level, lines, more)


def warn_ungeoreferenced(rasters: Sequence[RasterInfo]) -> None:
    """Warn of inputs without a CRS, once per kind.

    Their results are in pixel coordinates (no transform, or only GCPs) or in the coordinates
    of a geotransform whose CRS is not named.
    """
    gcps = []
    for info in rasters:
        if info.crs_wkt is None and info.gcp_crs is not None:
            gcps.append(
                f"{info.path} is georeferenced by GCPs ({info.gcp_crs}); results are in pixel "
                f"coordinates: warp it first with {info.georeferencing_fix()}"
            )
    log_a_few(
        logging.WARNING, gcps, "input(s) georeferenced by GCPs only (in pixel coordinates too)"
    )
    rpcs = [
        f"{r.path} is georeferenced by RPCs only (a scene before orthorectification): its "
        f"results are in pixel coordinates; {r.georeferencing_fix()} first"
        for r in rasters
        if r.crs_wkt is None and r.gcp_crs is None and r.has_rpcs
    ]
    log_a_few(logging.WARNING, rpcs, "input(s) georeferenced by RPCs only (in pixel coordinates)")
    bare = [
        f"{r.path} has no CRS: its results are in pixel coordinates (x = column, y = row)"
        for r in rasters
        if r.crs_wkt is None
        and r.gcp_crs is None
        and not r.has_rpcs
        and r.native_transform.is_identity
    ]
    log_a_few(logging.WARNING, bare, "input(s) without a CRS (in pixel coordinates too)")
    # A geotransform without a CRS (a world file without its .prj): the results are in the
    # transform's map coordinates, whose CRS only the user knows.
    unnamed = [
        f"{r.path} has a geotransform but no CRS: its results are in that transform's map "
        "coordinates, in a layer without CRS; give the file its CRS (gdal_edit.py -a_srs "
        f"EPSG:XXXX {r.path}) or set it on the layer in QGIS"
        for r in rasters
        if r.crs_wkt is None and r.gcp_crs is None and not r.native_transform.is_identity
    ]
    log_a_few(logging.WARNING, unnamed, "input(s) with a geotransform but no CRS")


def note_alpha_beside_nodata(rasters: Sequence[RasterInfo]) -> None:
    """Say which of the two masks counts for inputs with an alpha band AND a nodata value.

    GDAL lets the nodata value shadow the alpha band; mgpr takes the alpha band
    (:mod:`mgpr.geo.validity`), so a user who meant the nodata value learns it here.
    """
    lines = [
        f"{r.path} has an alpha band and nodata={r.nodata:g}: its alpha band says where it holds "
        "data (alpha 0 = none); the nodata value is not applied"
        for r in rasters
        if r.nodata is not None and "alpha" in r.colorinterp
    ]
    log_a_few(logging.INFO, lines, "input(s) with an alpha band and a nodata value")
