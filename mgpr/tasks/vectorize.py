"""Class map -> polygons, in bounded memory: ``rasterio.features.shapes`` per block, then a merge.

The COG is read in :data:`BLOCK_PX` square windows. Each window's regions (4-connected pixels of
one class) become polygons in map coordinates; a polygon that touches an interior window edge
may continue in the next window, so it is kept aside per class and all of those are unioned at
the end (``shapely.union_all``), which rejoins the pieces of a region cut by window edges. Other
polygons are final as they come. Pixels with the nodata value give no polygon.

Memory: one window of pixels plus the polygons themselves (the output), never the raster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

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


def vectorize_class_map(
    path: Path, names: Sequence[str], nodata: int, block_px: int = BLOCK_PX
) -> pa.Table:
    """Polygons of every class region of a class-map GeoTIFF (see the module docstring).

    Regions are traced and merged in RASTER pixel coordinates (integers, so pieces of one region
    share their edges exactly), then mapped through the raster's transform.

    Args:
        path: the class map (band 1 class ids).
        names: class names by id.
        nodata: the class map's nodata value (no polygon).
        block_px: window edge, pixels.

    Returns:
        One polygon per region in the raster's CRS, ordered by class then position.
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
    geoms = [_to_map(final_geoms[i], affine) for i in order]
    return polygons_table(geoms, [final_ids[i] for i in order], names)


def _to_map(geom: shapely.Geometry, affine: Affine) -> shapely.Geometry:
    """Raster pixel corner coordinates (x = column, y = row) -> map coordinates."""
    if affine.is_identity:
        return geom

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = affine * (xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geom, apply)
