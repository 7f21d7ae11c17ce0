"""Which layer each raster's features go to: one layer per CRS, CRSs compared by definition.

Rule (README "Layers"):

* rasters share a layer only if their CRSs are EQUAL (rasterio/PROJ equality of the
  definitions, not of the WKT text or the CRS name: two Lambert conformal conics that differ
  only in ``lon_0`` are two CRSs, and an EPSG code and its full WKT are one);
* with ``output_crs``: one layer ``<base>`` in that CRS, every raster's features reprojected
  (:func:`to_layer_crs`);
* a run whose rasters all have one CRS (or all have none) writes ``<base>`` alone
  (``detections`` / ``classifications``);
* otherwise every layer gets a suffix from its own CRS only, so a raster's layer name does not
  depend on the other inputs: ``_epsg<code>`` when the CRS is exactly an EPSG CRS,
  else ``_crs<first 8 hex of sha1(WKT)>``; rasters without a CRS (pixel coordinates) go to
  ``_pixel``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.crs import CRS

from mgpr.geo.raster import RasterInfo
from mgpr.outputs.vector import FeatureBatch


@dataclass(frozen=True, slots=True)
class Layer:
    """One output layer: its name, its CRS (WKT, None = pixel coordinates) and its rasters."""

    name: str
    crs_wkt: str | None
    paths: tuple[str, ...]


def crs_suffix(crs_wkt: str | None) -> str:
    """The layer suffix of one CRS (see the module docstring), without the leading ``_``."""
    if crs_wkt is None:
        return "pixel"
    crs = CRS.from_wkt(crs_wkt)
    epsg = crs.to_epsg(confidence_threshold=100)
    if epsg is not None:
        return f"epsg{epsg}"
    return "crs" + hashlib.sha1(crs.to_wkt().encode()).hexdigest()[:8]


def plan_layers(
    rasters: Sequence[RasterInfo], base: str, output_crs: str | None = None
) -> list[Layer]:
    """Group rasters by CRS equality into layers, in order of first appearance.

    ``output_crs`` (WKT; the ``output_crs`` key): one layer ``<base>`` in that CRS for every
    raster, whose features the merge reprojects into it (:func:`to_layer_crs`).
    """
    if output_crs is not None:
        return [Layer(base, output_crs, tuple(r.path for r in rasters))] if rasters else []
    groups: list[tuple[CRS | None, str | None, list[str]]] = []
    for info in rasters:
        crs = CRS.from_wkt(info.crs_wkt) if info.crs_wkt is not None else None
        for group_crs, _wkt, paths in groups:
            if (crs is None and group_crs is None) or (
                crs is not None and group_crs is not None and crs == group_crs
            ):
                paths.append(info.path)
                break
        else:
            groups.append((crs, info.crs_wkt, [info.path]))
    if len(groups) == 1:
        _crs, wkt, paths = groups[0]
        return [Layer(base, wkt, tuple(paths))]
    layers: list[Layer] = []
    used: set[str] = set()
    for _crs, wkt, paths in groups:
        name = f"{base}_{crs_suffix(wkt)}"
        if name in used:  # two unequal CRSs with one EPSG code: keep them apart by their WKT
            assert wkt is not None
            name = f"{base}_crs{hashlib.sha1(CRS.from_wkt(wkt).to_wkt().encode()).hexdigest()[:8]}"
        used.add(name)
        layers.append(Layer(name, wkt, tuple(paths)))
    return layers


#: Longest polygon edge, in the raster's pixels, reprojected as a straight chord: longer edges
#: are split first. A straight 2048 px edge of a 100 m raster bent 997 m (10 px) away from its
#: chord in EPSG:4326; the error shrinks with the square of the length: 64 px, ~0.01 px.
DENSIFY_PX = 64.0


def footprint_in(info: RasterInfo, crs_wkt: str | None) -> shapely.Geometry:
    """The raster's footprint in ``crs_wkt`` (its own when equal or None), densified edges.

    Continuous across the antimeridian of a wrapping CRS. Not made valid (callers that
    intersect footprints do so for every raster at once).
    """
    from mgpr.geo.antimeridian import unwrap_geometries, wrap_period
    from mgpr.geo.georef import raster_footprint
    from mgpr.geo.reproject import reproject_geometry, same_crs

    area = raster_footprint(info.height, info.width, info.transform, 16)
    if info.crs_wkt is not None and crs_wkt is not None and not same_crs(info.crs_wkt, crs_wkt):
        moved = reproject_geometry(area, info.crs_wkt, crs_wkt)
        if moved is not None:
            area = unwrap_geometries(moved, wrap_period(crs_wkt))  # as the features below
    return area


def _reference_x(info: RasterInfo, crs_wkt: str, period: float | None) -> float | None:
    """Where the raster's features are placed in a wrapping CRS: its footprint's centre x."""
    if period is None:
        return None
    x0, _y0, x1, _y1 = shapely.bounds(footprint_in(info, crs_wkt)).tolist()
    centre = 0.5 * (x0 + x1)
    return centre if np.isfinite(centre) else None


def to_layer_crs(batch: FeatureBatch, info: RasterInfo, layer: Layer) -> FeatureBatch:
    """``batch`` (in ``info``'s CRS) in ``layer``'s CRS: reprojected when they differ.

    Box rings keep their 4 corners (each reprojected exactly; a box's edges, straight in the
    raster's CRS, bend by far less than a millimetre over a tile). Polygons (segments,
    outlines) get a vertex every :data:`DENSIFY_PX` pixels along longer edges first, so their
    edges follow the curve they become. In a wrapping layer CRS every feature is continuous
    and placed next to its raster's footprint (:mod:`mgpr.geo.antimeridian`).
    """
    from mgpr.geo.antimeridian import (
        place_geometries_near,
        place_rings_near,
        unwrap_geometries,
        unwrap_rings,
        wrap_period,
    )
    from mgpr.geo.reproject import reproject_geometry, reproject_xy, same_crs

    if info.crs_wkt is None or layer.crs_wkt is None or same_crs(info.crs_wkt, layer.crs_wkt):
        return batch
    period = wrap_period(layer.crs_wkt)  # a box across 180 E stays one box, not the world
    reference = _reference_x(info, layer.crs_wkt, period)
    if batch.rings is not None:
        rings = unwrap_rings(reproject_xy(batch.rings, info.crs_wkt, layer.crs_wkt), period)
        rings = place_rings_near(rings, reference, period)
        # Counter-clockwise as written (a CRS with a flipped axis would mirror the ring).
        x, y = rings[:, :-1, 0], rings[:, :-1, 1]
        signed = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
        rings[signed < 0] = rings[signed < 0, ::-1]
        return FeatureBatch(rings, batch.fields)
    assert batch.geometries is not None
    t = info.transform
    pixel = min(float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e)))
    dense = shapely.segmentize(batch.geometries, DENSIFY_PX * pixel) if pixel > 0 else None
    moved = reproject_geometry(
        batch.geometries if dense is None else dense, info.crs_wkt, layer.crs_wkt
    )
    if moved is None:  # never for inputs the run's start checked (check_output_crs)
        raise ValueError(f"features of {info.path} do not map into the output CRS")
    moved = place_geometries_near(unwrap_geometries(moved, period), reference, period)
    if hasattr(shapely, "orient_polygons"):  # shapely >= 2.1
        moved = shapely.orient_polygons(moved)
    return FeatureBatch(None, batch.fields, moved)
