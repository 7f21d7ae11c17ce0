"""``gsd=``: each raster's header moved onto its model grid, after the checks that need it.

A model trained at 10 cm sees objects 3x too large on 3 cm imagery; with ``gsd=0.10`` every
raster is tiled on a grid of 10 cm pixels (:mod:`mgpr.geo.model_grid`). That needs the native
pixel size in metres, so a raster must have a projected CRS whose axes are in metres and a
north-up transform; anything else is refused in one line naming the raster and the fix
(``gdalwarp -t_srs EPSG:XXXX``, with the UTM zone of the raster's centre when it can be told).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mgpr.errors import InputError
from mgpr.geo.model_grid import gsd_factors, model_size, model_transform, resolve_resampling
from mgpr.geo.raster import RasterInfo

__all__ = ["check_gsd_crs", "describe_model_grid", "on_model_grid", "on_model_grids"]

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
    fx, fy = gsd_factors(info.native_transform, gsd)
    if fx == 1.0 and fy == 1.0:
        return dataclasses.replace(info, factor_x=1.0, factor_y=1.0, resampling=None)
    return dataclasses.replace(
        info,
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
    how = f", {info.resampling}" if info.resampling else ", read natively"
    return (
        f"{info.path} {info.native_width}x{info.native_height} px of {pixel} -> model grid "
        f"{info.width}x{info.height} px (factor {factor_text(info)}{how})"
    )


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
            f"`gdalwarp -t_srs EPSG:XXXX {info.path} warped.tif` (a projected CRS in metres, "
            f"e.g. its UTM zone), {fix}"
        )
    if info.crs_wkt is None:
        raise InputError(
            f"gsd={gsd:g} needs each raster's pixel size in metres, but {info.path!r} has no "
            f"CRS: georeference it first, e.g. `gdal_translate -a_srs EPSG:XXXX -a_ullr ULX ULY "
            f"LRX LRY {info.path} georef.tif` (a projected CRS in metres), {fix}"
        )
    from pyproj import CRS

    crs = CRS.from_wkt(info.crs_wkt)
    horizontal = crs.sub_crs_list[0] if crs.is_compound and crs.sub_crs_list else crs
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

    ``EPSG:XXXX`` when the centre cannot be located.
    """
    try:
        from pyproj import CRS, Transformer

        t = info.native_transform
        x, y = t * (info.native_width / 2, info.native_height / 2)
        to_lonlat = Transformer.from_crs(
            CRS.from_wkt(info.crs_wkt or ""), CRS.from_epsg(4326), always_xy=True
        )
        lon, lat = to_lonlat.transform(x, y)
        if not (-180.0 <= lon <= 180.0 and -84.0 <= lat <= 84.0):
            return "EPSG:XXXX"
        zone = min(60, int((lon + 180.0) // 6.0) + 1)
        return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"
    except Exception:  # a CRS pyproj cannot transform: no suggestion, still one line
        return "EPSG:XXXX"
