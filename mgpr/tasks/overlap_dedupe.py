"""Detections found twice where input rasters overlap on the ground (one layer, map frame).

A tiled orthophoto (a national mapping agency's 1 km sheets with a margin, a drone mosaic cut
into pieces with overlap) puts the same ground in two inputs, and each input's detector finds
the object there: one object, two features. Seam de-duplication (:mod:`mgpr.tasks.seam_dedupe`)
works inside one raster, in its pixels; this pass works between the rasters of one output layer
(one CRS, or ``output_crs``), in the layer's map coordinates, on the boxes' bounds (exact for
north-up rasters in one CRS; the bounding box of a reprojected box otherwise).

The rule is the seam rule across rasters: two boxes of the same class from different rasters are
one object when IoU > ``nms_iou`` or intersection over the smaller box >= ``seam_ios``; the
whole box (not touching its raster's edge) wins over one cut by its raster's edge, then the
higher score; on equal scores the EXACT box (its raster north-up in the layer's CRS, so the box
is its pixels' own, not the bounding box of a reprojected or rotated one), then the box of the
finer raster (smaller pixels in the layer's frame: the original over a downsampled copy), then
the larger box. Only boxes inside the overlap of two rasters' footprints take part, so a folder
whose inputs do not overlap costs one footprint test per pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import shapely

from mgpr.geo.raster import RasterInfo
from mgpr.geo.reproject import same_crs
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.layers import footprint_in
from mgpr.tasks.seam_dedupe import pair_overlaps

#: Pixels from a raster's edge within which a box counts as cut by that edge.
EDGE_PX = 1.0


def _cut_by_edge(batch: FeatureBatch, info: RasterInfo) -> npt.NDArray[np.bool_]:
    """Boxes within :data:`EDGE_PX` of their raster's edge (``px_*``: the file's pixels)."""
    px = [
        np.asarray(batch.fields[k], np.float64)
        for k in ("px_xmin", "px_ymin", "px_xmax", "px_ymax")
    ]
    w, h = info.native_width, info.native_height
    return (px[0] <= EDGE_PX) | (px[1] <= EDGE_PX) | (px[2] >= w - EDGE_PX) | (px[3] >= h - EDGE_PX)


def dedupe_across_inputs(
    batches: Sequence[FeatureBatch],
    rasters: Sequence[RasterInfo],
    crs_wkt: str | None,
    nms_iou: float,
    seam_ios: float,
) -> tuple[list[FeatureBatch], int]:
    """Each raster's batch without the boxes another raster of the layer found better.

    Args:
        batches: one detections batch per raster of the layer (layer CRS), in the layer's order.
        rasters: the rasters, same order.
        crs_wkt: the layer's CRS (None: pixel coordinates; rasters without CRS do not overlap
            on any ground, and are left as they are).
        nms_iou: IoU above which two boxes are one object.
        seam_ios: intersection over the smaller box at or above which they are one object.

    Returns:
        ``(batches, removed)``: the batches (the same objects where nothing was removed) and
        the number of boxes removed.
    """
    n = len(batches)
    if n < 2 or crs_wkt is None:
        return list(batches), 0
    prints = np.asarray([footprint_in(r, crs_wkt) for r in rasters], dtype=object)
    prints = shapely.make_valid(prints)
    left, right = shapely.STRtree(prints).query(prints, predicate="intersects")
    # Pairs whose bounding boxes share an area (a zero-area box overlap has a zero-area zone):
    # a folder of chips on a grid touches ~8 neighbours each along an edge or a corner, and
    # intersecting every such pair cost seconds for 20,000 chips.
    box = shapely.bounds(prints)
    width = np.minimum(box[left, 2], box[right, 2]) - np.maximum(box[left, 0], box[right, 0])
    height = np.minimum(box[left, 3], box[right, 3]) - np.maximum(box[left, 1], box[right, 1])
    kept = (left < right) & (width > 0) & (height > 0)
    left, right = left[kept], right[kept]
    overlaps = shapely.intersection(prints[left], prints[right])
    areas = shapely.area(overlaps)
    zones: dict[int, list[shapely.Geometry]] = {}
    for a, b, zone, area in zip(left.tolist(), right.tolist(), overlaps, areas, strict=True):
        if area > 0:
            zones.setdefault(a, []).append(zone)
            zones.setdefault(b, []).append(zone)
    if not zones:
        return list(batches), 0
    # Candidates: each raster's boxes inside one of its overlap zones.
    cand_raster, cand_index, cand_bounds, cand_score, cand_label, cand_cut = [], [], [], [], [], []
    cand_exact: list[npt.NDArray[np.bool_]] = []
    cand_pixel: list[npt.NDArray[np.float64]] = []
    for i, zone_list in zones.items():
        batch = batches[i]
        if not len(batch):
            continue
        bounds = batch.bounds()
        inside = np.zeros(len(bounds), dtype=bool)
        for zone in zone_list:
            # The zone's bounding box first (numpy, every box), the zone itself for those left.
            zx0, zy0, zx1, zy1 = zone.bounds
            near = np.flatnonzero(
                (bounds[:, 2] >= zx0)
                & (bounds[:, 0] <= zx1)
                & (bounds[:, 3] >= zy0)
                & (bounds[:, 1] <= zy1)
            )
            b = bounds[near]
            hit = shapely.intersects(zone, shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))
            inside[near[hit]] = True
        idx = np.flatnonzero(inside)
        if not len(idx):
            continue
        cand_raster.append(np.full(len(idx), i, np.int64))
        cand_index.append(idx)
        cand_bounds.append(bounds[idx])
        cand_score.append(np.asarray(batch.fields["score"], np.float64)[idx])
        cand_label.append(np.asarray(batch.fields["class_id"], np.int64)[idx])
        cand_cut.append(_cut_by_edge(batch, rasters[i])[idx])
        cand_exact.append(np.full(len(idx), _exact_boxes(rasters[i], crs_wkt)))
        pixel_area = float(shapely.area(prints[i])) / max(1, rasters[i].width * rasters[i].height)
        cand_pixel.append(np.full(len(idx), pixel_area))
    if len(cand_raster) < 2:
        return list(batches), 0
    raster = np.concatenate(cand_raster)
    index = np.concatenate(cand_index)
    gone = _duplicates(
        np.concatenate(cand_bounds),
        np.concatenate(cand_score),
        np.concatenate(cand_label),
        raster,
        np.concatenate(cand_cut),
        nms_iou,
        seam_ios,
        exact=np.concatenate(cand_exact),
        pixel_area=np.concatenate(cand_pixel),
    )
    out = list(batches)
    for i in np.unique(raster[gone]).tolist():
        drop = index[gone & (raster == i)]
        keep = np.ones(len(batches[i]), dtype=bool)
        keep[drop] = False
        out[i] = batches[i].take(keep)
    return out, int(gone.sum())


def _exact_boxes(info: RasterInfo, crs_wkt: str | None) -> bool:
    """Whether the raster's boxes reach the layer as its pixels' own rectangles.

    True when it is north-up (no rotation or shear) in the layer's CRS; a reprojected or
    rotated raster's box is the bounding box of its pixels' footprint, larger than the object.
    """
    t = info.transform
    return same_crs(info.crs_wkt, crs_wkt) and t.b == 0 and t.d == 0


def _round_relative(values: npt.NDArray[np.float64], digits: int = 6) -> npt.NDArray[np.float64]:
    """``values`` to ``digits`` significant digits: pixel areas equal up to float noise tie."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(values > 0, 10.0 ** (digits - 1 - np.floor(np.log10(values))), 1.0)
    return np.round(values * scale) / scale


def _duplicates(
    bounds: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    rasters: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
    exact: npt.NDArray[np.bool_] | None = None,
    pixel_area: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.bool_]:
    """Which candidates a better box of another raster already stands for (greedy by rank).

    ``exact``: the box is its raster's own pixels (north-up in the layer's CRS); ``pixel_area``:
    its raster's pixel area in the layer's units (squared). Both break score ties only; None:
    all alike.
    """
    n = len(bounds)
    exact = np.ones(n, dtype=bool) if exact is None else exact
    pixel_area = np.zeros(n) if pixel_area is None else pixel_area
    gone = np.zeros(n, dtype=bool)
    geoms = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (a != b) & (labels[a] == labels[b]) & (rasters[a] != rasters[b])
    a, b = a[pair], b[pair]
    if not len(a):
        return gone
    area = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    iou, ios = pair_overlaps(bounds, area, a, b)
    same = (iou > nms_iou) | (ios >= seam_ios)
    a, b = a[same], b[same]
    # Rank: whole boxes first, then score, then exact, then finer pixels, then area, then order.
    order = np.lexsort(
        (
            np.arange(n),
            -area,
            _round_relative(pixel_area),
            (~exact).astype(np.int64),
            -scores,
            cut.astype(np.int64),
        )
    )
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    neighbours: dict[int, list[int]] = {}
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        neighbours.setdefault(x, []).append(y)
    for i in order.tolist():
        if gone[i] or i not in neighbours:
            continue
        for j in neighbours[i]:  # i outranks every neighbour not yet decided
            if rank[j] > rank[i]:
                gone[j] = True
    return gone
