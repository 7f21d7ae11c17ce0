"""``aoi=``: the area of interest, a vector file of polygons; only what touches it is predicted.

An orthomosaic usually covers more than the study area (the flight's margins, a neighbour's
field, a collar). With ``aoi=area.gpkg`` (any file OGR reads: GeoPackage, GeoJSON, Shapefile,
FlatGeobuf ...; its polygons in any CRS), mgpr:

* plans only the tiles whose valid window shares area with the AOI (the others are never read:
  the saving is theirs, read and compute alike); an input wholly outside it is left out;
* keeps the model's input as it is (pixels outside the AOI are not blanked: an object or a
  field on the AOI's edge sees its whole context), and applies the AOI to the results by the
  rule the nodata mask uses (:mod:`mgpr.tasks.nodata`): a detection is kept when its box's
  centre lies in the AOI (after seam de-duplication, so the whole box decides), a class-map
  pixel when its centre does (outside: nodata); a classified tile is kept when it touches the AOI
  (its footprint is the tile the model saw).

Frames. The file's polygons are read in their own CRS, unioned (``make_valid`` first: hand-drawn
areas self-intersect) and, per raster, clipped to the raster's footprint in that CRS (so a
continent-wide AOI never meets a projection's edge), densified, reprojected to the raster's CRS
(pyproj) and moved into the raster's MODEL-grid pixel frame (``~transform``: x = column, y = row,
pixel corners, the frame of tiles and boxes before georeferencing; with ``gsd=`` the model grid).
That pixel-frame polygon travels with the raster's header (:attr:`RasterInfo.aoi_wkb`), so every
rank, worker and the merge apply the same area without reading the file again.

A raster without a CRS takes an AOI without one, in its own map frame (pixel coordinates when it
has no transform either: what its results are written in); mixing a CRS and none is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine

from mgpr.errors import InputError
from mgpr.geo.georef import raster_footprint
from mgpr.geo.raster import RasterInfo
from mgpr.geo.reproject import crs_label, crs_wkt_of, reproject_geometry, same_crs
from mgpr.geo.tiling import Tile, plan_tiles, tile_grid

log = logging.getLogger(__name__)

__all__ = [
    "AreaOfInterest",
    "aoi_geometry",
    "aoi_in_map",
    "map_areas",
    "centres_in_aoi",
    "on_aoi",
    "read_aoi",
    "tile_aoi_mask",
    "tiles_in_aoi",
]

#: Points per raster footprint side when it is moved into the AOI's CRS (curved in another CRS).
FOOTPRINT_POINTS = 64
#: An AOI edge is densified to at most this share of its extent before reprojection, so that a
#: long straight edge in degrees stays the curve it is in metres.
DENSIFY_SHARE = 1 / 256


@dataclass(frozen=True, slots=True)
class AreaOfInterest:
    """The area of interest as read from its file.

    Attributes:
        path: the file as the user gave it.
        crs_wkt: the file's CRS as WKT, or None when it has none.
        geometry: the union of its polygons, in that CRS (valid, non-empty).
        digest: SHA-256 of the geometry's WKB and the CRS: the run's fingerprint records it, so a
            resume with another area is refused, and re-saving the same area (QGIS touches a
            GeoPackage it opens) is not another area.
        polygons: polygons the file held.
    """

    path: str
    crs_wkt: str | None
    geometry: Any
    digest: str
    polygons: int

    @property
    def crs_label(self) -> str:
        """A short name of the AOI's CRS (``EPSG:4326``), or ``no CRS``."""
        return "no CRS" if self.crs_wkt is None else crs_label(self.crs_wkt)


def read_aoi(path: str) -> AreaOfInterest:
    """Read ``aoi=``: the union of the polygons of the file's one layer.

    Raises:
        InputError: a missing or unreadable file, several layers, no polygon in it.
    """
    import pyogrio
    import pyogrio.errors

    if not path.startswith("/vsi") and not Path(path).exists():
        raise InputError(f"aoi={path!r} does not exist; give the path of a polygon file")
    try:
        layers = pyogrio.list_layers(path)
        if len(layers) > 1:
            names = ", ".join(str(name) for name in layers[:, 0][:5])
            raise InputError(
                f"aoi={path!r} holds {len(layers)} layers ({names}); save the area of interest "
                "as a file of its own (QGIS: Export > Save Features As)"
            )
        meta, _, wkb, _ = pyogrio.raw.read(path, columns=[])
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        reason = str(exc).split("\n")[0]
        raise InputError(
            f"aoi={path!r} is not a readable vector file ({reason}); give a GeoPackage, "
            "GeoJSON or Shapefile of polygons"
        ) from None
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object)) if wkb is not None else np.empty(0)
    polygons = _polygons(geoms)
    if not polygons:
        kinds = sorted({g.geom_type for g in geoms if g is not None and not g.is_empty})
        held = f"only {', '.join(kinds)}" if kinds else "no geometry"
        raise InputError(
            f"aoi={path!r} holds {held}, no polygon; draw the area of interest as polygons"
        )
    geometry = shapely.union_all(shapely.make_valid(np.asarray(polygons, dtype=object)))
    geometry = _polygonal(geometry)
    if geometry.is_empty or geometry.area <= 0:
        raise InputError(f"aoi={path!r}: its polygons have no area; draw the area of interest")
    crs = meta.get("crs")
    crs_wkt = crs_wkt_of(crs) if crs else None
    return AreaOfInterest(path, crs_wkt, geometry, area_digest(geometry, crs_wkt), len(polygons))


def area_digest(geometry: Any, crs_wkt: str | None) -> str:
    """SHA-256 of an area: its normalised geometry at 10 significant digits, and its CRS.

    10 digits are a millimetre in metres or degrees: the same area saved by another program or
    format (GeoJSON prints fewer digits than a GeoPackage stores) is the same area.
    """

    def rounded(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.char.mod("%.10g", xy).astype(np.float64)

    wkb = shapely.to_wkb(shapely.transform(shapely.normalize(geometry), rounded))
    return hashlib.sha256(wkb + (crs_wkt or "").encode()).hexdigest()


def _polygons(geoms: npt.NDArray[Any]) -> list[Any]:
    """Every polygon of ``geoms`` (collections opened, other geometry types left out)."""
    out: list[Any] = []
    for geom in geoms:
        if geom is None or geom.is_empty:
            continue
        kind = geom.geom_type
        if kind in ("Polygon", "MultiPolygon"):
            out.append(geom)
        elif kind == "GeometryCollection":
            out += _polygons(np.asarray(list(geom.geoms), dtype=object))
    return out


def _polygonal(geometry: Any) -> Any:
    """The polygonal part of a geometry (``make_valid`` may leave lines of collapsed rings)."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = _polygons(np.asarray([geometry], dtype=object))
    return shapely.union_all(np.asarray(parts, dtype=object)) if parts else shapely.Polygon()


def on_aoi(rasters: Sequence[RasterInfo], aoi: AreaOfInterest) -> list[RasterInfo]:
    """The rasters that share area with ``aoi``, each with its AOI in its pixel frame.

    Inputs wholly outside are left out (one line each, up to 5, then a count).

    Raises:
        InputError: a raster and the AOI not both with or both without a CRS; no raster in it.
    """
    kept: list[RasterInfo] = []
    outside: list[str] = []
    for info in rasters:
        pixel = aoi_in_pixels(info, aoi)
        if pixel.is_empty:
            outside.append(info.path)
        else:
            kept.append(dataclasses.replace(info, aoi_wkb=shapely.to_wkb(pixel)))
    if not kept:
        first = rasters[0]
        raise InputError(
            f"no input raster overlaps aoi={aoi.path!r} (area bounds {_bounds(aoi.geometry)} in "
            f"{aoi.crs_label}; {first.path!r} covers {_raster_bounds(first)} in "
            f"{first.crs_label}); check that the area is drawn in the right CRS"
        )
    for path in outside[:5]:
        log.info("aoi: %s lies outside aoi=%s: left out", path, aoi.path)
    if len(outside) > 5:
        log.info("aoi: %d more inputs lie outside aoi=%s: left out", len(outside) - 5, aoi.path)
    return kept


def _bounds(geom: Any) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in geom.bounds) + ")"


def _raster_bounds(info: RasterInfo) -> str:
    return _bounds(raster_footprint(info.height, info.width, info.transform))


def _params(t: Affine) -> list[float]:
    """Affine ``t`` as shapely's ``[a, b, d, e, xoff, yoff]``."""
    return [t.a, t.b, t.d, t.e, t.c, t.f]


def _pixel_box(info: RasterInfo) -> Any:
    return shapely.box(0.0, 0.0, float(info.width), float(info.height))


def aoi_in_pixels(info: RasterInfo, aoi: AreaOfInterest) -> Any:
    """The part of ``aoi`` over ``info``, in its model-grid pixel frame (empty when none).

    Raises:
        InputError: one of the raster and the AOI has a CRS and the other has none.
    """
    if (info.crs_wkt is None) != (aoi.crs_wkt is None):
        if info.crs_wkt is None:
            raise InputError(
                f"{info.path!r} has no CRS, so aoi={aoi.path!r} ({aoi.crs_label}) cannot be "
                "placed on it; georeference the raster or draw the area in its pixel frame "
                "without a CRS"
            )
        raise InputError(
            f"aoi={aoi.path!r} has no CRS, so it cannot be placed on {info.path!r} "
            f"({info.crs_label}); set the layer's CRS (QGIS: Layer > Set CRS, or `ogr2ogr "
            "-a_srs EPSG:XXXX`)"
        )
    to_pixel = _params(~info.transform)
    box = _pixel_box(info)
    area = aoi.geometry
    if info.crs_wkt is not None and not same_crs(info.crs_wkt, aoi.crs_wkt):
        assert aoi.crs_wkt is not None
        footprint = raster_footprint(info.height, info.width, info.transform, FOOTPRINT_POINTS)
        footprint = reproject_geometry(footprint, info.crs_wkt, aoi.crs_wkt)
        if footprint is not None:  # only the AOI over the raster: no projection edge met
            area = shapely.intersection(area, footprint)
            if area.is_empty:
                return shapely.Polygon()
        extent = max(area.bounds[2] - area.bounds[0], area.bounds[3] - area.bounds[1])
        dense = shapely.segmentize(area, extent * DENSIFY_SHARE)
        area = reproject_geometry(dense, aoi.crs_wkt, info.crs_wkt)
        if area is None:
            raise InputError(
                f"aoi={aoi.path!r} ({aoi.crs_label}) cannot be reprojected to {info.path!r}'s "
                f"{info.crs_label}; clip the area to the raster's region"
            )
        area = shapely.make_valid(area)
    pixel = _polygonal(shapely.intersection(shapely.affinity.affine_transform(area, to_pixel), box))
    return pixel if pixel.area > 0 else shapely.Polygon()


def aoi_in_map(info: RasterInfo) -> Any | None:
    """The raster's AOI in its map coordinates (its grid's transform), or None without one."""
    if info.aoi_wkb is None:
        return None
    return shapely.affinity.affine_transform(
        shapely.from_wkb(info.aoi_wkb), _params(info.transform)
    )


def map_areas(rasters: Sequence[RasterInfo]) -> dict[str, Any]:
    """Each raster's AOI in map coordinates, by path (the previews outline it); {} without."""
    return {r.path: aoi_in_map(r) for r in rasters if r.aoi_wkb is not None}


@functools.lru_cache(maxsize=64)
def aoi_geometry(wkb: bytes) -> Any:
    """A raster's pixel-frame AOI from its header's WKB, prepared for repeated tests."""
    geom = shapely.from_wkb(wkb)
    shapely.prepare(geom)
    return geom


def tiles_in_aoi(info: RasterInfo, tile_size: int, overlap: int) -> tuple[list[Tile], int]:
    """The plan of ``info`` limited to its AOI, and how many tiles of its grid that leaves out.

    A tile is kept when its valid window (its part inside the raster) shares area with the AOI;
    one that only touches the AOI's edge is left out. Without an AOI: the whole plan, 0. The
    test runs on the grid's boxes in arrays and only the kept tiles are built (611,524 tiles,
    an area of 20,000 vertices: ``benchmarks/aoi_plan.py``).
    """
    if info.aoi_wkb is None:
        return plan_tiles(info.path, info.height, info.width, tile_size, overlap), 0
    grid = tile_grid(info.height, info.width, tile_size, overlap)
    rows = np.arange(grid.n_rows, dtype=np.float64) * grid.stride
    cols = np.arange(grid.n_cols, dtype=np.float64) * grid.stride
    row_end = np.minimum(rows + tile_size, info.height)
    col_end = np.minimum(cols + tile_size, info.width)
    boxes = shapely.box(cols[None, :], rows[:, None], col_end[None, :], row_end[:, None])
    area = aoi_geometry(info.aoi_wkb)
    keep = shapely.intersects(area, boxes)
    edge = keep & ~shapely.contains_properly(area, boxes)
    keep[edge] = ~shapely.touches(area, boxes[edge])  # touching only: no shared area
    tiles = plan_tiles(info.path, info.height, info.width, tile_size, overlap, keep=keep)
    return tiles, grid.n_tiles - len(tiles)


def centres_in_aoi(info: RasterInfo, boxes_px: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which boxes (``(N, 4)`` xyxy, raster model-grid pixels) have their centre in the AOI.

    A centre on the AOI's edge counts as in. All True without an AOI.
    """
    n = len(boxes_px)
    if info.aoi_wkb is None or n == 0:
        return np.ones(n, dtype=bool)
    cx = (boxes_px[:, 0] + boxes_px[:, 2]) * 0.5
    cy = (boxes_px[:, 1] + boxes_px[:, 3]) * 0.5
    return np.asarray(shapely.intersects_xy(aoi_geometry(info.aoi_wkb), cx, cy), dtype=bool)


def tile_aoi_mask(info: RasterInfo, tile: Tile) -> npt.NDArray[np.bool_] | None:
    """``(tile.height, tile.width)`` True where a tile pixel's centre lies in the AOI.

    None when the whole tile lies inside it (or there is no AOI): nothing to mask.
    """
    if info.aoi_wkb is None:
        return None
    area = aoi_geometry(info.aoi_wkb)
    window = shapely.box(
        tile.col_off, tile.row_off, tile.col_off + tile.width, tile.row_off + tile.height
    )
    if shapely.contains(area, window):
        return None
    from rasterio.features import geometry_mask

    part = shapely.intersection(area, window)
    if part.is_empty:
        return np.zeros((tile.height, tile.width), dtype=bool)
    return geometry_mask(
        [part],
        out_shape=(tile.height, tile.width),
        transform=Affine.translation(tile.col_off, tile.row_off),
        invert=True,
    )
