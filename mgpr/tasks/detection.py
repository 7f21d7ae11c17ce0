"""Detection: boxes per tile -> one polygon per object, de-duplicated across tile seams.

An instance segmenter (Mask R-CNN: boxes with a mask each) gives each object its outline: the
mask's pixels traced on the rank (:func:`tile_outlines`, column ``outline``), which becomes the
feature's geometry in place of its box; everything else (seams, nodata, aoi, overlaps between
inputs) is decided on the boxes, as for a box detector.

Per-rank records (:data:`RECORDS_SCHEMA`, one row per box, RASTER pixel corner coordinates,
x = column, y = row): boxes are clipped to the tile's part inside the raster and shifted from
tile to raster pixels on the rank, with two flags the merge needs: ``seam`` (the box enters an
overlap strip shared with a neighbouring tile) and ``cut`` (it touches an inner tile edge, so the
object may be truncated).

Merge, per raster: the seam boxes are de-duplicated across tiles
(:func:`~mgpr.tasks.seam_dedupe.dedupe_seam_boxes`), then every box becomes a polygon in the
raster's CRS (:func:`~mgpr.geo.georef.boxes_to_rings`). With ``aoi=`` a box whose centre lies
outside the area is left out after the de-duplication (:func:`~mgpr.geo.aoi.centres_in_aoi`).
Boxes found twice where two inputs of one layer overlap on the ground are de-duplicated between
them (:mod:`~mgpr.tasks.overlap_dedupe`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import shapely

from mgpr.geo.aoi import centres_in_aoi
from mgpr.geo.georef import boxes_to_rings, pixel_size
from mgpr.geo.ground_area import box_ground_areas_m2, ground_areas_m2
from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile, TileId, box_touches_tile_edge
from mgpr.models.base import Detections, InstanceMask
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import STATUS_DONE, TaskContext, TileOutcome, VectorTask, label_names
from mgpr.tasks.layers import Layer
from mgpr.tasks.overlap_dedupe import dedupe_across_inputs
from mgpr.tasks.seam_dedupe import dedupe_seam_boxes

RECORDS_SCHEMA = pa.schema(
    [
        ("tile_key", pa.string()),
        ("path", pa.string()),
        ("x0", pa.float64()),
        ("y0", pa.float64()),
        ("x1", pa.float64()),
        ("y1", pa.float64()),
        ("score", pa.float64()),
        ("label", pa.int64()),
        ("seam", pa.bool_()),
        ("cut", pa.bool_()),
        # An instance segmenter's object outline: WKB (Multi)Polygon in RASTER pixel corner
        # coordinates; null for a box detector (and in parts written before outlines were).
        ("outline", pa.binary()),
    ]
)

#: Sort order of a raster's boxes before the merge: deterministic whatever wrote them.
_ORDER = [
    ("tile_key", "ascending"),
    ("label", "ascending"),
    ("score", "descending"),
    ("x0", "ascending"),
    ("y0", "ascending"),
    ("x1", "ascending"),
    ("y1", "ascending"),
]


def _tile_boxes(
    tile: Tile, det: Detections, info: RasterInfo, overlap: int
) -> dict[str, np.ndarray]:
    """Clip a tile's boxes to its valid extent, flag seam/cut boxes, shift to raster pixels."""
    boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, tile.valid_width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, tile.valid_height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    cut = box_touches_tile_edge(
        boxes, tile, 1.0, raster_height=info.height, raster_width=info.width
    )
    # A box reaches a seam when it enters an overlap strip along an inner edge.
    margin = max(float(overlap), 1.0)
    seam = box_touches_tile_edge(
        boxes, tile, margin, raster_height=info.height, raster_width=info.width
    )
    shift = np.array([tile.col_off, tile.row_off, tile.col_off, tile.row_off], np.float64)
    outlines: list[bytes | None] = [None] * int(keep.sum())
    if det.masks is not None:
        outlines = tile_outlines([m for m, k in zip(det.masks, keep, strict=True) if k], tile)
    return {
        "boxes": boxes[keep] + shift,
        "score": np.asarray(det.scores, np.float64)[keep],
        "label": np.asarray(det.labels, np.int64)[keep],
        "seam": np.asarray(seam, bool)[keep],
        "cut": np.asarray(cut, bool)[keep],
        "outline": np.array(outlines, dtype=object),
    }


#: Objects in a tile above which their outlines are traced in shared label images: one GDAL
#: polygonize of a 512 px window costs ~6 ms, one per object's crop ~0.6 ms.
SHARED_TRACE_OBJECTS = 10


def tile_outlines(crops: Sequence[InstanceMask], tile: Tile) -> list[bytes | None]:
    """Every object's outline of one tile (:func:`mask_outline` each), traced in few calls.

    Up to :data:`SHARED_TRACE_OBJECTS` objects each crop is traced alone. Beyond, the objects
    are laid into label images (object i as value i + 1), a new image whenever an object's
    pixels meet one already laid (masks of neighbouring objects may overlap), and each image is
    traced once over the window its objects cover; each object gets the union of the polygons
    of its value: the same outlines as crop by crop, at ~0.6x the cost for 100 overlapping
    objects of a 512 px tile, ~0.7x for 30 (``benchmarks/instance_outlines.py``).
    """
    if len(crops) <= SHARED_TRACE_OBJECTS:
        return [mask_outline(c, tile) for c in crops]
    from affine import Affine
    from rasterio.features import shapes

    height, width = tile.valid_height, tile.valid_width
    layers: list[np.ndarray] = []
    windows: list[list[int]] = []  # row0, row1, col0, col1 covered per layer
    for i, crop in enumerate(crops):
        h = max(0, min(crop.mask.shape[0], height - crop.row))
        w = max(0, min(crop.mask.shape[1], width - crop.col))
        pixels = crop.mask[:h, :w]
        if not pixels.any():
            continue
        rows, cols = slice(crop.row, crop.row + h), slice(crop.col, crop.col + w)
        free = [j for j, layer in enumerate(layers) if not layer[rows, cols][pixels].any()]
        if not free:
            layers.append(np.zeros((height, width), np.int32))
            windows.append([height, 0, width, 0])
        layer, window = layers[free[0] if free else -1], windows[free[0] if free else -1]
        layer[rows, cols][pixels] = i + 1
        window[:] = [
            min(window[0], crop.row),
            max(window[1], crop.row + h),
            min(window[2], crop.col),
            max(window[3], crop.col + w),
        ]
    parts: list[list[shapely.Geometry]] = [[] for _ in crops]
    for layer, (r0, r1, c0, c1) in zip(layers, windows, strict=True):
        view = layer[r0:r1, c0:c1]
        origin = Affine.translation(tile.col_off + c0, tile.row_off + r0)
        for geom, value in shapes(view, mask=view > 0, connectivity=8, transform=origin):
            parts[int(value) - 1].append(shapely.geometry.shape(geom))
    return [
        None if not p else bytes(shapely.to_wkb(p[0] if len(p) == 1 else shapely.MultiPolygon(p)))
        for p in parts
    ]


def mask_outline(crop: InstanceMask, tile: Tile) -> bytes | None:
    """An object's pixels as a (Multi)Polygon in RASTER pixel corners (WKB); None if it has none.

    Pixels past the tile's part inside the raster (edge tiles' padding) are left out, as boxes
    are clipped there. The outline follows the pixel edges exactly (rasterio's polygonize of
    the crop, 8-connected, holes kept), so its area is the mask's pixel count.
    """
    from affine import Affine
    from rasterio.features import shapes

    pixels = crop.mask[
        : max(0, tile.valid_height - crop.row), : max(0, tile.valid_width - crop.col)
    ]
    if not pixels.any():
        return None
    origin = Affine.translation(tile.col_off + crop.col, tile.row_off + crop.row)
    parts = [
        shapely.geometry.shape(geom)
        for geom, _value in shapes(
            pixels.astype(np.uint8), mask=pixels, connectivity=8, transform=origin
        )
    ]
    outline = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return bytes(shapely.to_wkb(outline))


class DetectionTask(VectorTask):
    """Boxes per tile (``Detections``) -> layer ``detections``."""

    name = "detection"
    record_type = Detections
    layer_base = "detections"
    overlap_warning = (
        "overlap=0 with a detector: objects cut by a tile seam are found as "
        "two halves; set overlap to at least the largest object's size in pixels"
    )
    records_schema: ClassVar[pa.Schema] = RECORDS_SCHEMA

    def records(self, outcomes: Sequence[TileOutcome], ctx: TaskContext) -> pa.Table:
        """One row per kept box of every done tile (see the module docstring)."""
        parts = []
        keys: list[str] = []
        paths: list[str] = []
        for out in outcomes:
            if out.status != STATUS_DONE or out.record is None:
                continue
            rows = _tile_boxes(out.tile, out.record, ctx.rasters[out.tile.id.path], ctx.overlap)
            n = len(rows["score"])
            if n:
                parts.append(rows)
                keys += [out.tile.id.key()] * n
                paths += [out.tile.id.path] * n
        if not parts:
            return RECORDS_SCHEMA.empty_table()
        boxes = np.concatenate([p["boxes"] for p in parts])
        columns = {
            "tile_key": keys,
            "path": paths,
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            **{c: np.concatenate([p[c] for p in parts]) for c in ("score", "label", "seam", "cut")},
            "outline": pa.array(np.concatenate([p["outline"] for p in parts]), pa.binary()),
        }
        return pa.table(columns, schema=RECORDS_SCHEMA)

    def across_inputs(
        self, batches: list[FeatureBatch], rasters: list[RasterInfo], layer: Layer, ctx: TaskContext
    ) -> tuple[list[FeatureBatch], int]:
        """Boxes found twice where the layer's rasters overlap (:mod:`.overlap_dedupe`)."""
        return dedupe_across_inputs(batches, rasters, layer.crs_wkt, ctx.nms_iou, ctx.seam_ios)

    def features(
        self, info: RasterInfo, records: pa.Table, ctx: TaskContext, tiles: Mapping[str, Tile]
    ) -> tuple[FeatureBatch, int]:
        """Seam boxes de-duplicated across tiles, then one polygon per box."""
        table = records.sort_by(_ORDER)
        tile_key = np.array(table["tile_key"].to_pylist(), dtype=object)
        boxes = np.stack(
            [table[c].to_numpy().astype(np.float64) for c in ("x0", "y0", "x1", "y1")], axis=1
        ).reshape(-1, 4)
        score = table["score"].to_numpy().astype(np.float64)
        label = table["label"].to_numpy().astype(np.int64)
        seam = table["seam"].to_numpy(zero_copy_only=False).astype(bool)
        cut = table["cut"].to_numpy(zero_copy_only=False).astype(bool)
        n = len(score)
        keep = np.ones(n, dtype=bool)
        seam_idx = np.flatnonzero(seam)
        if len(seam_idx):
            _, tile_ids = np.unique(tile_key[seam_idx], return_inverse=True)
            keep[seam_idx] = dedupe_seam_boxes(
                boxes[seam_idx],
                score[seam_idx],
                label[seam_idx],
                tile_ids.astype(np.int64),
                cut[seam_idx],
                ctx.nms_iou,
                ctx.seam_ios,
            )
        removed = int(n - keep.sum())
        # aoi=: the box that won its seam decides, by its centre (mgpr.geo.aoi).
        keep[keep] = centres_in_aoi(info, boxes[keep])
        boxes = boxes[keep]
        # px_* are the FILE's pixels: model-grid pixels times native pixels per model pixel (gsd=)
        native_px = boxes * np.array([info.factor_x, info.factor_y] * 2, dtype=np.float64)
        keys = tile_key[keep]
        ids = [TileId.from_key(k) for k in keys]
        labels = label[keep]
        fields = {
            "score": score[keep],
            "class_id": labels,
            "label": label_names(labels, ctx.categories),
            "source": np.array([info.path] * len(keys), dtype=object),
            "tile_row": np.array([t.row for t in ids], dtype=np.int64),
            "tile_col": np.array([t.col for t in ids], dtype=np.int64),
            "tile_key": np.array(keys, dtype=object),
            "px_xmin": native_px[:, 0],
            "px_ymin": native_px[:, 1],
            "px_xmax": native_px[:, 2],
            "px_ymax": native_px[:, 3],
        }
        # The (model) grid's transform: exact whatever gsd.
        rings = boxes_to_rings(boxes, info.transform)
        outlines = table["outline"].to_numpy(zero_copy_only=False)[keep]
        if not any(o is not None for o in outlines):
            fields["area_m2"] = box_ground_areas_m2(rings, info.crs_wkt)  # on the ground, any CRS
            return FeatureBatch(rings, fields), removed
        # An instance segmenter: each object's outline (its box where its mask is empty).
        geoms = map_outlines(outlines, info)
        boxes_only = np.flatnonzero(shapely.is_missing(geoms))
        geoms[boxes_only] = shapely.polygons(rings[boxes_only])
        # the mask's own area, also with simplify (which moves a staircase's edges outwards)
        fields["area_m2"] = ground_areas_m2(geoms, info.crs_wkt)
        if ctx.simplify > 0:  # each object alone: objects may overlap, they share no edges
            tolerance = ctx.simplify * math.prod(pixel_size(info.transform)) ** 0.5
            geoms = np.asarray(shapely.simplify(geoms, tolerance, preserve_topology=True))
        return FeatureBatch.of_geometries(geoms, fields), removed


def map_outlines(outlines: np.ndarray, info: RasterInfo) -> np.ndarray:
    """WKB outlines in the (model) grid's pixel corners -> shapely geometries in map units.

    Through the grid's transform (``info.transform``: affine, so straight pixel edges stay
    straight, rotated grids too); None stays None.
    """
    t = info.transform
    geoms = shapely.from_wkb(outlines)

    def to_map(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    return np.asarray(shapely.transform(geoms, to_map), dtype=object)
