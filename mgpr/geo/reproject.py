"""Coordinates from one CRS to another (pyproj), for the area of interest and ``output_crs``.

Every transform here is ``always_xy``: x = easting or longitude, y = northing or latitude,
whatever axis order the CRS's definition states (EPSG:4326 says latitude first); that is the
order GeoPackage, GeoParquet and QGIS store. A point that does not map (outside the target
projection's domain) comes back non-finite; callers decide what that means.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

from mgpr.errors import InputError
from mgpr.geo.georef import raster_footprint
from mgpr.geo.raster import RasterInfo

log = logging.getLogger(__name__)

__all__ = [
    "check_output_crs",
    "crs_label",
    "crs_wkt_of",
    "horizontal_crs",
    "own_lonlat",
    "reproject_geometry",
    "reproject_xy",
    "same_crs",
    "transformer",
]


def crs_wkt_of(value: str) -> str:
    """Any CRS text pyproj reads (``EPSG:4326``, WKT, PROJ, a URN) as WKT.

    Raises:
        pyproj.exceptions.CRSError: text that names no CRS.
    """
    from pyproj import CRS

    return str(CRS.from_user_input(value).to_wkt())


@functools.lru_cache(maxsize=256)
def crs_label(value: str) -> str:
    """A short name of a CRS text: ``EPSG:4326``, else the CRS's own name (cached by text)."""
    from pyproj import CRS

    crs = CRS.from_user_input(value)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.name)


@functools.lru_cache(maxsize=256)
def same_crs(a: str | None, b: str | None) -> bool:
    """Whether two CRS texts define one CRS (by definition, not by text); None is no CRS.

    Cached by the texts: parsing two WKTs takes ~0.25 ms, and a merge asks once per input
    (a folder of 20,000 chips in one CRS spent 10 s here before).
    """
    if a is None or b is None:
        return a is None and b is None
    from pyproj import CRS

    return bool(CRS.from_user_input(a) == CRS.from_user_input(b))


@functools.lru_cache(maxsize=32)
def transformer(from_crs: str, to_crs: str) -> Any:
    """A pyproj transformer between two CRS texts, x/y order (cached: built once per pair)."""
    from pyproj import CRS, Transformer

    return Transformer.from_crs(
        CRS.from_user_input(from_crs), CRS.from_user_input(to_crs), always_xy=True
    )


def horizontal_crs(crs: Any) -> Any:
    """The horizontal part of a compound pyproj CRS (a projection + heights), else ``crs``."""
    return crs.sub_crs_list[0] if crs.is_compound and crs.sub_crs_list else crs


@functools.lru_cache(maxsize=64)
def own_lonlat(crs_wkt: str) -> tuple[Any, Any, Any] | None:
    """``(horizontal CRS, transformer to its own datum's lon/lat, its pyproj Proj)``.

    None without a datum. Point scales (``gsd``) and ground areas are taken on the CRS's own
    ellipsoid, so no datum shift enters; the Proj gives the projection factors. Cached: a
    folder of 1,500 tiles shares one CRS, and a Transformer takes milliseconds to build.
    """
    from pyproj import CRS, Proj, Transformer

    horizontal = horizontal_crs(CRS.from_wkt(crs_wkt))
    geodetic = horizontal.geodetic_crs
    if geodetic is None:
        return None
    to_lonlat = Transformer.from_crs(horizontal, geodetic, always_xy=True)
    return horizontal, to_lonlat, Proj(horizontal)


def reproject_xy(
    xy: npt.NDArray[np.float64], from_crs: str, to_crs: str
) -> npt.NDArray[np.float64]:
    """``(..., 2)`` coordinates from ``from_crs`` to ``to_crs`` (same shape; inf where none)."""
    flat = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    x, y = transformer(from_crs, to_crs).transform(flat[:, 0], flat[:, 1])
    return np.column_stack([x, y]).reshape(np.shape(xy))


def reproject_geometry(geom: Any, from_crs: str, to_crs: str) -> Any | None:
    """A shapely geometry (or array of them) through :func:`reproject_xy`.

    Returns None when any of its points does not map (non-finite in ``to_crs``).
    """

    def move(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return reproject_xy(xy, from_crs, to_crs)

    out = shapely.transform(geom, move)
    return out if np.isfinite(shapely.get_coordinates(out)).all() else None


#: Degrees around a CRS's area of use inside which no warning is given.
AREA_OF_USE_MARGIN_DEG = 5.0
#: Points per raster footprint side checked against the output CRS's domain.
FOOTPRINT_POINTS = 32


def check_output_crs(rasters: Sequence[RasterInfo], output_crs: str) -> None:
    """Refuse, before any work, an input whose results ``output_crs`` cannot hold.

    Raises:
        InputError: an input without a CRS (pixel coordinates have no place in another CRS),
            or one whose footprint does not map into ``output_crs`` (outside its domain: a UTM
            zone far from the raster, a polar projection).
    """
    for info in rasters:
        if info.crs_wkt is None:
            how = (
                f"is georeferenced by GCPs ({info.gcp_crs}), not a transform"
                if info.gcp_crs is not None
                else "is georeferenced by RPCs only"
                if info.has_rpcs
                else "has no CRS"
            )
            raise InputError(
                f"{info.path!r} {how}, so its results (in pixel coordinates) cannot be "
                f"reprojected to output_crs={output_crs!r}; give it map coordinates first, "
                f"{info.georeferencing_fix()}, or unset output_crs"
            )
        if same_crs(info.crs_wkt, output_crs):
            continue
        footprint = raster_footprint(info.height, info.width, info.transform, FOOTPRINT_POINTS)
        if reproject_geometry(footprint, info.crs_wkt, output_crs) is None:
            raise InputError(
                f"{info.path!r} ({info.crs_label}) lies outside the area output_crs="
                f"{output_crs!r} can represent; choose a CRS that covers it (EPSG:4326 covers "
                "every input)"
            )
        outside = _outside_area_of_use(footprint, info.crs_wkt, output_crs)
        if outside is not None:
            log.warning(
                "%s lies outside output_crs=%s's area of use (%s): its results there are "
                "valid coordinates but strongly distorted; a CRS made for the region is better",
                info.path,
                output_crs,
                outside,
            )


def _outside_area_of_use(footprint: Any, crs_wkt: str, output_crs: str) -> str | None:
    """The output CRS's area of use when the footprint lies wholly outside it, else None."""
    from pyproj import CRS

    area = CRS.from_user_input(output_crs).area_of_use
    if area is None:
        return None
    lonlat = reproject_geometry(footprint, crs_wkt, "EPSG:4326")
    if lonlat is None:
        return None
    west, south, east, north = area.bounds
    # A margin: a CRS is routinely used a little past its area (UTM zones, 3 degrees or so).
    m = AREA_OF_USE_MARGIN_DEG
    west, south, east, north = west - m, max(-90.0, south - m), east + m, min(90.0, north + m)
    if east - west >= 360:  # every longitude: the latitudes decide
        west, east = -180.0, 180.0
    else:
        west, east = (west + 180) % 360 - 180, (east + 180) % 360 - 180
    boxes = (
        [shapely.box(west, south, east, north)]
        if west <= east
        else [shapely.box(west, south, 180, north), shapely.box(-180, south, east, north)]
    )
    if any(shapely.intersects(lonlat, b) for b in boxes):
        return None
    w, s_, e, n = area.bounds
    return f"{w:g}..{e:g} E, {s_:g}..{n:g} N"
