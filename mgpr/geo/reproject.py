"""Coordinates from one CRS to another (pyproj), for the area of interest and ``output_crs``.

Every transform here is ``always_xy``: x = easting or longitude, y = northing or latitude,
whatever axis order the CRS's definition states (EPSG:4326 says latitude first); that is the
order GeoPackage, GeoParquet and QGIS store. A point that does not map (outside the target
projection's domain) comes back non-finite; callers decide what that means.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

__all__ = ["crs_wkt_of", "reproject_geometry", "reproject_xy", "same_crs", "transformer"]


def crs_wkt_of(value: str) -> str:
    """Any CRS text pyproj reads (``EPSG:4326``, WKT, PROJ, a URN) as WKT.

    Raises:
        pyproj.exceptions.CRSError: text that names no CRS.
    """
    from pyproj import CRS

    return str(CRS.from_user_input(value).to_wkt())


def same_crs(a: str | None, b: str | None) -> bool:
    """Whether two CRS texts define one CRS (by definition, not by text); None is no CRS."""
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
