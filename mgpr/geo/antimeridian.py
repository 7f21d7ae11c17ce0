"""Features across the antimeridian: one continuous ring, not one spanning the world.

A box whose corners lie on both sides of 180 degrees E (Fiji, the Aleutians, Chukotka: a UTM
zone 1 or 60 raster, or a geographic one) gets longitudes near +180 and near -180 in a
geographic CRS, and x near +20,037 km and -20,037 km in Web Mercator. Drawn as written, that
ring spans the whole map (40,075 km wide in EPSG:3857), and its area on the ground came out
as hundreds of square kilometres for a 450 m^2 box. Here such a ring is made continuous by
moving its western-side vertices one period east: longitudes past 180 (180.0003), which
GeoPackage, GeoParquet and QGIS take as they are, and which keep the box's shape and area.

Which CRSs wrap: geographic ones (period 360 degrees), and cylindrical projections (x linear in
longitude at every latitude: Web Mercator, World Mercator, plate carree, cylindrical
equal-area), whose period is the x of 360 degrees. Every other projection (UTM, conics,
polar) is continuous across the antimeridian where it is defined, and is left alone.

Continuous features are not enough: of one raster across 180 degrees E, features wholly west
of the line came out near +180 and those wholly east near -180, the layer's extent (and a
GeoParquet bbox) spanning the world and a class map's vectorised objects drawn 360 degrees away
from the holes they fill. So every feature of a raster is then PLACED within half a period of
one reference x, the centre of the raster's own (continuous) footprint in the layer's CRS:
:func:`place_rings_near`, :func:`place_geometries_near`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

__all__ = [
    "place_geometries_near",
    "place_rings_near",
    "unwrap_geometries",
    "unwrap_longitudes",
    "unwrap_rings",
    "wrap_period",
]

#: Longitude step of the probe along the equator and along 60 degrees N, degrees.
_PROBE_STEP_DEG = 0.5


@functools.lru_cache(maxsize=64)
def wrap_period(crs_wkt: str | None) -> float | None:
    """The x period of a CRS that wraps at the antimeridian (360 for degrees), else None."""
    if crs_wkt is None:
        return None
    from pyproj import CRS, Transformer

    from mgpr.geo.reproject import horizontal_crs

    try:
        crs = horizontal_crs(CRS.from_user_input(crs_wkt))
        if crs.is_geographic:
            unit = (crs.axis_info[0].unit_name or "degree").lower() if crs.axis_info else "degree"
            return 360.0 if "degree" in unit else None
        geodetic = crs.geodetic_crs
        if geodetic is None:
            return None
        to_crs = Transformer.from_crs(geodetic, crs, always_xy=True)
    except Exception:  # an engineering or odd CRS pyproj cannot take apart: never wraps here
        return None
    lon = np.arange(-180.0, 180.0, _PROBE_STEP_DEG) + _PROBE_STEP_DEG / 2
    steps = []
    for lat in (0.0, 60.0):
        x, _y = to_crs.transform(lon, np.full_like(lon, lat), errcheck=False)
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            return None
        steps.append(np.diff(x))
    equator, north = steps
    typical = float(np.median(np.abs(equator)))
    if typical == 0.0:
        return None
    # Cylindrical: equal x steps, the same at 60 N, apart from at most one jump (the wrap
    # meridian, lon_0 + 180, when it falls inside the probe).
    even = np.isclose(np.abs(equator), typical, rtol=1e-6)
    if np.count_nonzero(~even) > 1 or not np.allclose(equator, north, rtol=1e-6, atol=1e-6):
        return None
    return typical * (360.0 / _PROBE_STEP_DEG)


def unwrap_longitudes(lon: npt.NDArray[np.float64], period: float = 360.0) -> np.ndarray:
    """``(N, K)`` vertex x of N small rings, each moved within half a period of its first vertex.

    Returns a new array; rings that do not cross the wrap are unchanged.
    """
    lon = np.asarray(lon, dtype=np.float64)
    first = lon[..., :1]
    return lon - period * np.round((lon - first) / period)


def unwrap_rings(rings: npt.NDArray[np.float64], period: float | None) -> np.ndarray:
    """``(N, K, 2)`` rings with those spanning over half a period made continuous (see module).

    Continuous rings past the wrap are moved so their first vertex keeps its place: a ring
    written with vertices at 179.9999 and -179.9999 becomes 179.9999 .. 180.0001.
    """
    if period is None or not len(rings):
        return rings
    x = rings[..., 0]
    crossing = (x.max(axis=1) - x.min(axis=1)) > period / 2
    if not crossing.any():
        return rings
    out = np.array(rings, dtype=np.float64, copy=True)
    out[crossing, :, 0] = unwrap_longitudes(out[crossing, :, 0], period)
    return out


def _with_bounds(geoms: Any) -> tuple[np.ndarray, np.ndarray]:
    """``geoms`` as an object array and its ``(N, 4)`` bounds (none for an empty array)."""
    array = np.asarray(geoms, dtype=object)
    if not array.size:
        return array, np.empty((0, 4))
    return array, shapely.bounds(array).reshape(-1, 4)


def unwrap_geometries(geoms: Any, period: float | None) -> Any:
    """Shapely geometries (an array) with those spanning over half a period made continuous.

    Each such geometry's vertices west of its middle move one period east. Geometries that do
    not span half the world (every tile-sized feature away from 180 degrees) are returned as
    they are, without a copy.
    """
    if period is None:
        return geoms
    array, bounds = _with_bounds(geoms)
    if not array.size:
        return geoms
    with np.errstate(invalid="ignore"):
        crossing = (bounds[:, 2] - bounds[:, 0]) > period / 2
    if not crossing.any():
        return geoms
    out = array.copy()
    for index in np.flatnonzero(crossing):
        geom = out.flat[index]
        middle = 0.5 * (bounds[index, 0] + bounds[index, 2])

        def east(xy: npt.NDArray[np.float64], middle: float = middle) -> np.ndarray:
            moved = xy.copy()
            moved[moved[:, 0] < middle, 0] += period
            return moved

        out.flat[index] = shapely.transform(geom, east)
    return out


def _periods_off(centre: npt.NDArray[np.float64], reference: float, period: float) -> np.ndarray:
    """Whole periods each centre lies from ``reference`` (0 within half a period of it)."""
    return np.round((np.asarray(centre, dtype=np.float64) - reference) / period)


def place_rings_near(
    rings: npt.NDArray[np.float64], reference: float | None, period: float | None
) -> np.ndarray:
    """``(N, K, 2)`` continuous rings, each moved by whole periods to lie near ``reference``.

    ``reference``: an x of the layer's CRS (the raster's footprint centre); None or a CRS that
    does not wrap: the rings as they are.
    """
    if period is None or reference is None or not len(rings):
        return rings
    shift = _periods_off(rings[..., 0].mean(axis=1), reference, period)
    if not shift.any():
        return rings
    out = np.array(rings, dtype=np.float64, copy=True)
    out[..., 0] -= (period * shift)[:, None]
    return out


def place_geometries_near(geoms: Any, reference: float | None, period: float | None) -> Any:
    """Continuous shapely geometries (an array), each moved by whole periods near ``reference``.

    Only geometries more than half a period away are copied and moved (none away from 180).
    """
    if period is None or reference is None:
        return geoms
    array, bounds = _with_bounds(geoms)
    if not array.size:
        return geoms
    with np.errstate(invalid="ignore"):
        shift = _periods_off(0.5 * (bounds[:, 0] + bounds[:, 2]), reference, period)
    shift[~np.isfinite(shift)] = 0.0  # empty geometries
    moving = np.flatnonzero(shift)
    if not len(moving):
        return geoms
    out = array.copy()
    for index in moving.tolist():
        dx = -period * float(shift[index])
        out.flat[index] = shapely.transform(
            out.flat[index], lambda xy, dx=dx: xy + np.array([dx, 0.0])
        )
    return out
