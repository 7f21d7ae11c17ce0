"""Class map -> polygons, in bounded memory: ``rasterio.features.shapes`` per block, then a merge.

The COG is read in :data:`BLOCK_PX` square windows. Each window's regions (4-connected pixels of
one class) become polygons in map coordinates; a polygon that touches an interior window edge
may continue in the next window, so it is kept aside per class and all of those are unioned at
the end (``shapely.union_all``), which rejoins the pieces of a region cut by window edges. Other
polygons are final as they come. Pixels with the nodata value give no polygon.

Memory: one window of pixels plus the polygons themselves (the output), never the raster.
Works on uint8 and uint16 class maps alike. :func:`class_map_features` hands the polygons to the
run's vector writers as a geometries :class:`~mgpr.outputs.vector.FeatureBatch` (layer
``segments``, :func:`mgpr.tasks.segmentation.write_polygons`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

from mgpr.geo.georef import pixel_size
from mgpr.outputs.vector import FeatureBatch

#: Window edge of the vectorising pass, pixels (a multiple of the COG's 512 px blocks).
BLOCK_PX = 2048


def polygons_table(
    geoms: Sequence[shapely.Geometry], class_ids: Sequence[int], names: Sequence[str]
) -> pa.Table:
    """Features table: ``geometry`` (WKB), ``class_id`` (int32), ``label`` (class name)."""
    ids = np.asarray(class_ids, np.int32)
    labels = [names[i] if 0 <= i < len(names) else str(i) for i in ids.tolist()]
    return pa.table(
        {
            "geometry": pa.array(
                shapely.to_wkb(np.asarray(geoms, dtype=object)).tolist() if len(geoms) else [],
                pa.binary(),
            ),
            "class_id": pa.array(ids, pa.int32()),
            "label": pa.array(labels, pa.string()),
        }
    )


def trace_regions(
    path: Path, nodata: int, block_px: int = BLOCK_PX
) -> tuple[list[shapely.Geometry], list[int], Affine]:
    """Every class region of a class-map GeoTIFF as one polygon (see the module docstring).

    Regions are traced and merged in RASTER pixel coordinates (integers, so pieces of one region
    share their edges exactly), then mapped through the raster's transform.

    Args:
        path: the class map (band 1 class ids, uint8 or uint16).
        nodata: the class map's nodata value (no polygon).
        block_px: window edge, pixels.

    Returns:
        ``(polygons, class ids, transform)``: one Polygon (holes kept) per 4-connected region
        in the raster's CRS, ordered by class then position, and the class map's pixel -> map
        transform (the caller's scale for anything in pixels, without opening it again).
    """
    final_geoms: list[shapely.Geometry] = []
    final_ids: list[int] = []
    open_pieces: dict[int, list[shapely.Geometry]] = {}
    with rasterio.open(path) as src:
        height, width, affine = src.height, src.width, src.transform
        for row in range(0, height, block_px):
            for col in range(0, width, block_px):
                win = Window(col, row, min(block_px, width - col), min(block_px, height - row))
                block = src.read(1, window=win)
                valid = block != nodata
                if not valid.any():
                    continue
                shift = Affine.translation(col, row)
                r_edges = (
                    row if row > 0 else None,
                    row + win.height if row + win.height < height else None,
                )
                c_edges = (
                    col if col > 0 else None,
                    col + win.width if col + win.width < width else None,
                )
                for geojson, value in rasterio.features.shapes(
                    block, mask=valid, connectivity=4, transform=shift
                ):
                    geom = shapely.geometry.shape(geojson)
                    c0, r0, c1, r1 = geom.bounds
                    if r0 == r_edges[0] or r1 == r_edges[1] or c0 == c_edges[0] or c1 == c_edges[1]:
                        open_pieces.setdefault(int(value), []).append(geom)
                    else:
                        final_geoms.append(geom)
                        final_ids.append(int(value))
    for value, pieces in open_pieces.items():
        for geom in shapely.get_parts(shapely.union_all(pieces)).tolist():
            final_geoms.append(geom)
            final_ids.append(value)
    order = sorted(range(len(final_ids)), key=lambda i: (final_ids[i], final_geoms[i].bounds))
    return (
        [_to_map(final_geoms[i], affine) for i in order],
        [final_ids[i] for i in order],
        affine,
    )


def vectorize_class_map(
    path: Path, names: Sequence[str], nodata: int, block_px: int = BLOCK_PX
) -> pa.Table:
    """:func:`trace_regions` as a features table (:func:`polygons_table`)."""
    geoms, ids, _affine = trace_regions(path, nodata, block_px)
    return polygons_table(geoms, ids, names)


def class_map_features(
    path: Path,
    names: Sequence[str],
    nodata: int,
    source: str,
    *,
    crs_wkt: str | None,
    block_px: int = BLOCK_PX,
    simplify: float = 0.0,
) -> FeatureBatch:
    """:func:`trace_regions` as a :class:`~mgpr.outputs.vector.FeatureBatch` for the writers.

    Columns: ``class_id`` (int64), ``label`` (the class name, or the id as text when the model
    names none), ``source`` (``source``: the input raster's path), ``area`` (float64, the
    polygon's area in the CRS's units squared: m^2 for a projected CRS in metres, degrees^2 for
    a geographic one, pixels^2 for a raster without CRS) and ``area_m2`` (float64, its area on
    the ground, :func:`~mgpr.geo.ground_area.ground_areas_m2`: square metres on the CRS's
    ellipsoid in any CRS, NaN without one). ``crs_wkt`` is the class map's CRS, the input
    raster's (the map is on its grid), which the caller holds.

    ``simplify`` > 0: the regions simplified as one coverage (``shapely.coverage_simplify``,
    GEOS's Visvalingam-Whyatt on shared edges: neighbours keep one common boundary, no gaps or
    overlaps appear) to within ``simplify`` class-map pixels; ``area`` and ``area_m2`` stay
    the exact regions' (their pixels' area), as the per-class totals are.
    """
    from mgpr.geo.ground_area import ground_areas_m2

    geoms, ids, affine = trace_regions(path, nodata, block_px)
    class_ids = np.asarray(ids, dtype=np.int64)
    labels = np.array(
        [names[i] if 0 <= i < len(names) else str(i) for i in ids], dtype=object
    ).reshape(-1)
    shapes = np.empty(len(geoms), dtype=object)
    shapes[:] = geoms
    area = shapely.area(shapes).astype(np.float64) if len(geoms) else np.empty(0)
    area_m2 = ground_areas_m2(shapes, crs_wkt)  # the exact regions', also with simplify
    if simplify > 0 and len(shapes):
        tolerance = simplify * math.prod(pixel_size(affine)) ** 0.5  # pixels -> map units
        shapes[:] = list(shapely.coverage_simplify(shapes, tolerance))
    return FeatureBatch.of_geometries(
        shapes,
        {
            "class_id": class_ids,
            "label": labels,
            "source": np.full(len(geoms), source, dtype=object),
            "area": area,
            "area_m2": area_m2,
        },
    )


def _to_map(geom: shapely.Geometry, affine: Affine) -> shapely.Geometry:
    """Raster pixel corner coordinates (x = column, y = row) -> map coordinates."""
    if affine.is_identity:
        return geom

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = affine * (xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geom, apply)
