"""Polygon areas on the ground: square metres on the CRS's ellipsoid, whatever the projection.

Why not the planar area: a map's square unit is a ground square metre only where the
projection's scale is 1. In Web Mercator (EPSG:3857, what tile-server downloads come in) a
polygon at 50 degrees N has 2.4x its ground area; in a geographic CRS the planar area is in
square degrees. Segmentation users report hectares of canopy or water, so the ``area_m2``
column is the geodesic area (pyproj's ``Geod``, Karney's algorithm) of each polygon after its
vertices are taken to the CRS's own longitude/latitude; it is NaN without a CRS. A local
engineering CRS (a site grid: no datum, axes in metres or feet) is a plane by definition: its
planar area times the unit's square is the ground area (it was NaN).
Detection boxes, a million at a time and each small, take a vectorised local form instead
(:func:`box_ground_areas_m2`): their corners in longitude/latitude times the ellipsoid's local
metres per degree.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely

from mgpr.geo.antimeridian import unwrap_geometries, unwrap_longitudes

__all__ = ["box_ground_areas_m2", "ground_areas_m2", "local_plane_m2_per_unit2"]


def local_plane_m2_per_unit2(crs_wkt: str) -> float | None:
    """Square metres per square unit of an engineering CRS with linear axes, else None.

    Only for CRSs without a geodetic datum (``LOCAL_CS``, engineering): projected and
    geographic ones get the ellipsoid's area instead.
    """
    from pyproj import CRS

    try:
        crs = CRS.from_user_input(crs_wkt)
        if crs.geodetic_crs is not None or not crs.axis_info:
            return None
        factors = {float(a.unit_conversion_factor or 0.0) for a in crs.axis_info[:2]}
        units = {(a.unit_name or "").lower() for a in crs.axis_info[:2]}
    except Exception:  # an odd definition: no area rather than a wrong one
        return None
    if len(factors) != 1 or any("degree" in u or "radian" in u for u in units):
        return None
    (factor,) = factors
    return factor * factor if factor > 0 else None


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
    plane = local_plane_m2_per_unit2(crs_wkt)
    if plane is not None:
        return np.asarray(shapely.area(np.asarray(shapes, dtype=object)), np.float64) * plane
    from mgpr.geo.reproject import own_lonlat

    try:
        parts = own_lonlat(crs_wkt)
        geod = parts[0].geodetic_crs.get_geod() if parts is not None else None
    except Exception:  # an engineering CRS pyproj cannot take apart: no ground area
        return out
    if parts is None or geod is None:
        return out
    horizontal, to_lonlat, _projection = parts
    lonlat = shapes
    if not horizontal.is_geographic:

        def project(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            lon, lat = to_lonlat.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([lon, lat])

        lonlat = shapely.transform(shapes, project)
    lonlat = unwrap_geometries(lonlat, 360.0)  # across 180 E: one small polygon, not the world
    # Counter-clockwise shells and clockwise holes: Geod's signed ring areas then add up.
    oriented = shapely.orient_polygons(lonlat, exterior_cw=False)
    for i, geom in enumerate(oriented):
        if geom is not None and not geom.is_empty:
            area, _perimeter = geod.geometry_area_perimeter(geom)
            out[i] = area
    return out


def box_ground_areas_m2(
    rings: npt.NDArray[np.float64], crs_wkt: str | None
) -> npt.NDArray[np.float64]:
    """Ground areas in m^2 of small quadrilaterals (detection boxes), vectorised; NaN without CRS.

    Args:
        rings: (N, 5, 2) closed rings in the CRS's coordinates (x = easting or longitude).
        crs_wkt: their CRS, or None.

    The corners go to the CRS's own longitude/latitude (one vectorised transform), and each
    box's area there, in square degrees about its centre (no cancellation of large
    coordinates), times M(lat) N(lat) cos(lat) (pi/180)^2 (the ellipsoid's meridian and
    prime-vertical radii at the centre). Over a box of metres to hundreds of metres that is the
    geodesic area to ~1e-7; 1M boxes take about a second, where the per-polygon geodesic sum of
    :func:`ground_areas_m2` took 25 s. Projection factors are not used: Web Mercator's are the
    sphere's, 0.3 % off the ellipsoid's area at 60 degrees N.
    """
    rings = np.asarray(rings, dtype=np.float64).reshape(-1, 5, 2)
    out = np.full(len(rings), np.nan, dtype=np.float64)
    if crs_wkt is None or not len(rings):
        return out
    plane = local_plane_m2_per_unit2(crs_wkt)
    if plane is not None:
        x, y = rings[:, :4, 0], rings[:, :4, 1]
        x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
        shoelace = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
        return np.asarray(0.5 * np.abs(shoelace) * plane, dtype=np.float64)
    from mgpr.geo.reproject import own_lonlat

    try:
        parts = own_lonlat(crs_wkt)
    except Exception:  # an engineering CRS pyproj cannot take apart: no ground area
        return out
    if parts is None:
        return out
    horizontal, to_lonlat, _projection = parts
    corners = rings[:, :4, :]
    if horizontal.is_geographic:
        lon, lat = corners[..., 0], corners[..., 1]
    else:
        flat_lon, flat_lat = to_lonlat.transform(corners[..., 0].ravel(), corners[..., 1].ravel())
        lon = np.asarray(flat_lon, dtype=np.float64).reshape(-1, 4)
        lat = np.asarray(flat_lat, dtype=np.float64).reshape(-1, 4)
    lon = unwrap_longitudes(lon)  # a box across 180 E: corners at +-180 about one centre
    lon_c, lat_c = lon.mean(axis=1, keepdims=True), lat.mean(axis=1, keepdims=True)
    dx, dy = lon - lon_c, lat - lat_c
    square_degrees = 0.5 * np.abs(
        (dx * np.roll(dy, -1, axis=1) - np.roll(dx, -1, axis=1) * dy).sum(axis=1)
    )
    ellipsoid = horizontal.ellipsoid
    a = float(ellipsoid.semi_major_metre)
    inverse_f = float(ellipsoid.inverse_flattening or 0.0)
    e2 = 0.0 if inverse_f == 0.0 else (2.0 - 1.0 / inverse_f) / inverse_f
    phi = np.radians(lat_c[:, 0])
    w = 1.0 - e2 * np.sin(phi) ** 2
    meridian = a * (1.0 - e2) / w**1.5  # radius of curvature along the meridian, m
    prime_vertical = a / np.sqrt(w)  # radius of curvature across it, m
    area = square_degrees * np.radians(1.0) ** 2 * meridian * prime_vertical * np.cos(phi)
    good = np.isfinite(area)
    out[good] = area[good]
    return out
