"""``gsd=``: each raster's header moved onto its model grid, after the checks that need it.

A model trained at 10 cm sees objects 3x too large on 3 cm imagery; with ``gsd=0.10`` every
raster is tiled on a grid of 10 cm pixels (:mod:`mgpr.geo.model_grid`). That needs the native
pixel size in metres, so a raster must have a projected CRS whose axes are in metres and a
north-up transform; anything else is refused in one line naming the raster and the fix
(``gdalwarp -t_srs EPSG:XXXX``, with the UTM zone of the raster's centre when it can be told).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from mgpr.errors import InputError
from mgpr.geo.model_grid import gsd_factors, model_size, model_transform, resolve_resampling
from mgpr.geo.raster import RasterInfo

__all__ = [
    "check_gsd_crs",
    "crs_scale",
    "describe_crs_scale",
    "describe_model_grid",
    "on_model_grid",
    "on_model_grids",
]

_METRE_UNITS = {"metre", "meter", "metres", "meters", "m"}


def on_model_grids(rasters: Sequence[RasterInfo], gsd: float, resampling: str) -> list[RasterInfo]:
    """Every raster on its model grid; the first raster that cannot be is refused.

    Raises:
        InputError: a raster without a projected CRS in metres, or with a rotated transform.
    """
    return [on_model_grid(info, gsd, resampling) for info in rasters]


def on_model_grid(info: RasterInfo, gsd: float, resampling: str) -> RasterInfo:
    """``info`` with ``height``, ``width`` and ``transform`` of its model grid at ``gsd``.

    The ``native_*`` fields keep the file's; ``factor_x``/``factor_y`` are native pixels per
    model pixel and ``resampling`` the GDAL method its reads use (``auto`` resolved:
    :func:`mgpr.geo.model_grid.resolve_resampling`). A raster whose native pixels already are
    ``gsd`` (factors 1) keeps native reads (``resampling`` None).

    Raises:
        InputError: see :func:`check_gsd_crs`.
    """
    check_gsd_crs(info, gsd)
    scale = crs_scale(info)
    fx, fy = gsd_factors(info.native_transform, gsd * scale)
    if fx == 1.0 and fy == 1.0:
        return dataclasses.replace(
            info, factor_x=1.0, factor_y=1.0, resampling=None, crs_scale=scale
        )
    return dataclasses.replace(
        info,
        crs_scale=scale,
        height=model_size(info.native_height, fy),
        width=model_size(info.native_width, fx),
        transform=model_transform(info.native_transform, fx, fy),
        factor_x=fx,
        factor_y=fy,
        resampling=resolve_resampling(resampling, fx, fy),
    )


def describe_model_grid(info: RasterInfo) -> str:
    """One phrase for the log: native size and pixel, model grid, factor and resampling."""
    res_x, res_y = abs(info.native_transform.a), abs(info.native_transform.e)
    pixel = f"{res_x:g} m" if res_x == res_y else f"{res_x:g} x {res_y:g} m"
    if info.crs_scale != 1.0:  # the CRS's metres; on the ground they are smaller or larger
        ground = res_x / info.crs_scale
        pixel = f"{pixel} of {info.crs_label} (~{ground:.3g} m on the ground)"
    how = f", {info.resampling}" if info.resampling else ", read natively"
    return (
        f"{info.path} {info.native_width}x{info.native_height} px of {pixel} -> model grid "
        f"{info.width}x{info.height} px (factor {factor_text(info)}{how})"
    )


#: A CRS whose metre is within this share of a ground metre at the raster is taken at face
#: value (UTM: 0.04 % to 0.1 %; national grids likewise), so their model grids, and the runs
#: that recorded them, stay as they were.
SCALE_TOLERANCE = 0.01

#: Across one raster, a scale that varies more than this gets a warning: model pixels are
#: ``gsd`` on the ground at its centre only.
SCALE_SPREAD_WARNING = 0.02


def point_scales(info: RasterInfo) -> list[float] | None:
    """The CRS's point scale (CRS metres per ground metre) at the centre, then the corners.

    pyproj's projection factors: the square root of the areal scale, exact for conformal
    projections (Mercator, UTM, Lambert conformal, stereographic: the same in every
    direction) and the mean of the two axes for the others. None where it cannot be told.
    """
    try:
        from mgpr.geo.reproject import own_lonlat

        parts = own_lonlat(info.crs_wkt or "")
        if parts is None:
            return None
        _horizontal, to_lonlat, projection = parts
        t = info.native_transform
        w, h = info.native_width, info.native_height
        out = []
        for col, row in ((w / 2, h / 2), (0, 0), (w, 0), (0, h), (w, h)):
            lon, lat = to_lonlat.transform(*(t * (col, row)))
            factors = projection.get_factors(lon, lat)
            out.append(float(factors.areal_scale) ** 0.5)
    except Exception:  # a CRS pyproj cannot take apart: face value, as before
        return None
    return out if all(math.isfinite(k) and k > 0 for k in out) else None


def crs_scale(info: RasterInfo) -> float:
    """CRS metres per ground metre at the raster's centre; 1.0 within :data:`SCALE_TOLERANCE`.

    Why: ``gsd`` is the model's ground resolution. A projection's metre is a ground metre
    only where its scale is 1: Web Mercator (EPSG:3857, what XYZ tile downloads come in)
    stretches by 1 / cos(latitude), 1.56 at 50 degrees N, so 0.3 "m" pixels there are 0.19 m
    on the ground, and taking them at face value showed the model objects 1.56x too large.
    """
    scales = point_scales(info)
    if scales is None or abs(scales[0] - 1.0) <= SCALE_TOLERANCE:
        return 1.0
    return round(scales[0], 6)


def describe_crs_scale(info: RasterInfo, gsd: float) -> str | None:
    """One log line when the CRS's metre is not a ground metre at the raster, else None."""
    scales = point_scales(info)
    if scales is None:
        return None
    lo, hi = min(scales), max(scales)
    spread = hi / lo - 1.0
    parts = []
    if info.crs_scale != 1.0:
        parts.append(
            f"{info.path}: a metre of {info.crs_label} is {1 / info.crs_scale:.3g} m on the "
            f"ground at its centre, so its model grid has pixels of {gsd * info.crs_scale:.4g} "
            f"CRS metres ({gsd:g} m on the ground)"
        )
    if spread > SCALE_SPREAD_WARNING:
        parts.append(
            f"{info.path}: the scale of {info.crs_label} varies by {spread:.0%} across it, so "
            f"model pixels are {gsd:g} m on the ground at its centre only; warp it to a local "
            f"CRS first (e.g. gdalwarp -t_srs {_suggest_epsg(info)}) for one scale everywhere"
        )
    return "; ".join(parts) or None


def factor_text(info: RasterInfo) -> str:
    """``2`` or ``1.5 x 2`` (columns x rows): native pixels per model pixel."""
    fx, fy = info.factor_x, info.factor_y
    return f"{fx:g}" if fx == fy else f"{fx:g} x {fy:g}"


def check_gsd_crs(info: RasterInfo, gsd: float) -> None:
    """Refuse ``gsd`` for a raster whose pixel size in metres is not known from its header.

    Raises:
        InputError: no CRS (GCPs only, or none), a geographic CRS, a projected CRS in feet or
            another unit, or a rotated/sheared transform; one line with the fix.
    """
    fix = "or unset gsd to run at the raster's own resolution"
    if info.crs_wkt is None and info.gcp_crs:
        raise InputError(
            f"gsd={gsd:g} needs each raster's pixel size in metres, but {info.path!r} is "
            f"georeferenced by GCPs ({info.gcp_crs}), not a transform: warp it first with "
            f"{info.georeferencing_fix(projected=True)} (a projected CRS in metres, e.g. its "
            f"UTM zone), {fix}"
        )
    if info.crs_wkt is None and info.has_rpcs:
        raise InputError(
            f"gsd={gsd:g} needs each raster's pixel size in metres, but {info.path!r} is "
            f"georeferenced by RPCs only (a scene before orthorectification): "
            f"{info.georeferencing_fix()} (a projected CRS in metres for -t_srs), {fix}"
        )
    if info.crs_wkt is None:
        raise InputError(
            f"gsd={gsd:g} needs each raster's pixel size in metres, but {info.path!r} has no "
            f"CRS: georeference it first, e.g. {info.georeferencing_fix()} (a projected CRS in "
            f"metres), {fix}"
        )
    from pyproj import CRS

    from mgpr.geo.reproject import horizontal_crs

    horizontal = horizontal_crs(CRS.from_wkt(info.crs_wkt))
    units = {a.unit_name.lower() for a in horizontal.axis_info[:2]}
    if not horizontal.is_projected or not units <= _METRE_UNITS:
        kind = (
            "geographic"
            if horizontal.is_geographic
            else "projected"
            if (horizontal.is_projected)
            else "not projected"
        )
        raise InputError(
            f"gsd={gsd:g} needs a projected CRS in metres, but {info.path!r} is in "
            f"{info.crs_label} ({kind}, {'/'.join(sorted(units)) or 'no unit'}): warp it first "
            f"with `gdalwarp -t_srs {_suggest_epsg(info)} {info.path} warped.tif`, {fix}"
        )
    t = info.native_transform
    if t.b != 0.0 or t.d != 0.0:
        raise InputError(
            f"gsd={gsd:g} needs a north-up raster, but {info.path!r} has a rotated or sheared "
            f"transform ({t.a:g}, {t.b:g}, {t.d:g}, {t.e:g}): warp it first with `gdalwarp "
            f"-t_srs {info.crs_label} {info.path} northup.tif`, {fix}"
        )


def _suggest_epsg(info: RasterInfo) -> str:
    """The WGS 84 / UTM zone of the raster's centre (``EPSG:326zz`` / ``EPSG:327zz``).

    Polewards of 84 degrees (where UTM ends) the UPS North / South CRS (``EPSG:32661`` /
    ``EPSG:32761``); a centre longitude past 180 (a raster across the antimeridian) is wrapped
    into -180..180 first. ``EPSG:XXXX`` when the centre cannot be located.
    """
    try:
        from pyproj import CRS, Transformer

        t = info.native_transform
        x, y = t * (info.native_width / 2, info.native_height / 2)
        to_lonlat = Transformer.from_crs(
            CRS.from_wkt(info.crs_wkt or ""), CRS.from_epsg(4326), always_xy=True
        )
        lon, lat = to_lonlat.transform(x, y)
        if not (math.isfinite(lon) and math.isfinite(lat) and -90.0 <= lat <= 90.0):
            return "EPSG:XXXX"
        if abs(lat) > 84.0:
            return "EPSG:32661" if lat > 0 else "EPSG:32761"  # UPS: UTM's polar companion
        lon = (lon + 180.0) % 360.0 - 180.0
        zone = min(60, int((lon + 180.0) // 6.0) + 1)
        return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"
    except Exception:  # a CRS pyproj cannot transform: no suggestion, still one line
        return "EPSG:XXXX"
