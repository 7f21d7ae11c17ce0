"""Polygon areas on the ground: square metres on the CRS's ellipsoid, whatever the projection.

Why not the planar area: a map's square unit is a ground square metre only where the
projection's scale is 1. In Web Mercator (EPSG:3857, what tile-server downloads come in) a
polygon at 50 degrees N has 2.4x its ground area; in a geographic CRS the planar area is in
square degrees. Segmentation users report hectares of canopy or water, so the ``area_m2``
column is the geodesic area (pyproj's ``Geod``, Karney's algorithm) of each polygon after its
vertices are taken to the CRS's own longitude/latitude; it is NaN without a CRS or a datum.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely

__all__ = ["ground_areas_m2"]


def ground_areas_m2(
    shapes: npt.NDArray[np.object_], crs_wkt: str | None
) -> npt.NDArray[np.float64]:
    """Each polygon's area in m^2 on the ellipsoid of ``crs_wkt``; NaN where it cannot be told.

    Args:
        shapes: shapely (multi)polygons in the CRS's coordinates (x = easting or longitude).
        crs_wkt: their CRS; None (a raster without CRS: pixel coordinates) gives NaN.
    """
    out = np.full(len(shapes), np.nan, dtype=np.float64)
    if crs_wkt is None or not len(shapes):
        return out
    from mgpr.geo.reproject import own_lonlat

    try:
        parts = own_lonlat(crs_wkt)
        geod = parts[0].geodetic_crs.get_geod() if parts is not None else None
    except Exception:  # an engineering CRS pyproj cannot take apart: no ground area
        return out
    if parts is None or geod is None:
        return out
    horizontal, to_lonlat = parts
    lonlat = shapes
    if not horizontal.is_geographic:

        def project(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            lon, lat = to_lonlat.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([lon, lat])

        lonlat = shapely.transform(shapes, project)
    # Counter-clockwise shells and clockwise holes: Geod's signed ring areas then add up.
    oriented = shapely.orient_polygons(lonlat, exterior_cw=False)
    for i, geom in enumerate(oriented):
        if geom is not None and not geom.is_empty:
            area, _perimeter = geod.geometry_area_perimeter(geom)
            out[i] = area
    return out
