"""Cross-tile de-duplication of detection boxes found twice along tile seams (one raster).

Moved unchanged from the first edition's shard module: the algorithm and its tests are the
same; only its home changed (it is the detection task's, :mod:`mgpr.tasks.detection`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def dedupe_seam_boxes(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.bool_]:
    """Which seam boxes survive cross-tile de-duplication (one raster, raster pixels).

    Two boxes of the same class are the same object when their IoU >= ``nms_iou``
    (torchvision's ``batched_nms``), or, coming from *different* tiles, when their intersection
    over the smaller box's area (IoS) >= ``seam_ios``: a box cut by a tile edge lies inside the
    whole box that the neighbouring tile saw, so its IoU can be low while its IoS is ~1 (the case
    SAHI and GeoDeep handle the same way). Boxes are ranked by (not cut first, score, area), so
    the whole box wins over its truncated copy. Pixel frame and map frame give the same answer:
    an affine map scales every area by the same factor, so IoU and IoS are unchanged.

    A box can only suppress a box it intersects, so the greedy suppression runs independently on
    each connected group of intersecting same-class boxes (found with a shapely STRtree): the
    result equals one global greedy pass, at a cost near-linear in the number of boxes rather
    than quadratic (a 40,000 px orthomosaic can hold 10^5 seam boxes).

    Args:
        boxes: (N, 4) xyxy, raster pixel corner coordinates.
        scores: (N,) scores.
        labels: (N,) class ids.
        tiles: (N,) an integer id of the tile each box came from.
        cut: (N,) True where the box touches an inner tile edge.
        nms_iou: IoU threshold.
        seam_ios: IoS threshold.

    Returns:
        (N,) bool keep mask.
    """
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(boxes)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (left < right) & (labels[left] == labels[right])
    left, right = left[pair], right[pair]
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    groups = np.split(order, bounds)
    pairs = np.array([g for g in groups if len(g) == 2], dtype=np.int64).reshape(-1, 2)
    keep[_dedupe_pairs(pairs, boxes, scores, tiles, cut, nms_iou, seam_ios)] = False
    for members in groups:
        if len(members) > 2:
            keep[members] = _dedupe_group(
                boxes[members],
                scores[members],
                labels[members],
                tiles[members],
                cut[members],
                nms_iou,
                seam_ios,
            )
    return keep


def _dedupe_pairs(
    pairs: npt.NDArray[np.int64],
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.int64]:
    """Indexes suppressed in groups of exactly two boxes, vectorised (the common case).

    Same rule as :func:`_dedupe_group` for two boxes: the one ranked first by (not cut, score,
    area, index) stays; the other goes when IoU > ``nms_iou`` (torchvision's strict rule) or,
    from another tile, when IoS >= ``seam_ios``.
    """
    if len(pairs) == 0:
        return np.empty(0, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # a is ranked first unless b beats it on (cut asc, score desc, area desc); a < b on ties.
    key_a = np.stack([cut[a].astype(np.float64), -scores[a], -area[a]], axis=1)
    key_b = np.stack([cut[b].astype(np.float64), -scores[b], -area[b]], axis=1)
    differs = key_a != key_b
    first_diff = np.argmax(differs, axis=1)
    rows = np.arange(len(pairs))
    b_first = differs.any(axis=1) & (key_b[rows, first_diff] < key_a[rows, first_diff])
    loser = np.where(b_first, a, b)
    iou, ios = pair_overlaps(boxes, area, a, b)
    gone = (iou > nms_iou) | ((ios >= seam_ios) & (tiles[a] != tiles[b]))
    suppressed: npt.NDArray[np.int64] = loser[gone].astype(np.int64)
    return suppressed


def pair_overlaps(
    boxes: npt.NDArray[np.float64],
    area: npt.NDArray[np.float64],
    a: npt.NDArray[np.int64],
    b: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """IoU and intersection over the smaller box of the box pairs ``(a[k], b[k])``, vectorised.

    ``boxes`` (N, 4) xyxy, ``area`` their areas; 0 where a box has no area. Shared by the seam
    rule and the one between overlapping inputs (:mod:`mgpr.tasks.overlap_dedupe`).
    """
    ix = np.minimum(boxes[a, 2], boxes[b, 2]) - np.maximum(boxes[a, 0], boxes[b, 0])
    iy = np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    union = area[a] + area[b] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    smaller = np.minimum(area[a], area[b])
    ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, ios


def _dedupe_group(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.bool_]:
    """Greedy IoU (torchvision) then IoS suppression over one group; see dedupe_seam_boxes."""
    import torch
    from torchvision.ops import batched_nms

    n = len(boxes)
    keep = np.zeros(n, dtype=bool)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Priority: whole boxes first, then score, then area; ties broken by input order.
    order = np.lexsort((np.arange(n), -area, -scores, cut.astype(np.int64)))
    priority = np.empty(n, dtype=np.float64)
    priority[order] = np.arange(n, 0, -1, dtype=np.float64)
    survivors = batched_nms(
        torch.as_tensor(boxes), torch.as_tensor(priority), torch.as_tensor(labels), nms_iou
    ).numpy()
    cand = np.zeros(n, dtype=bool)
    cand[survivors] = True
    kept: list[int] = []
    for i in order[cand[order]]:
        if kept:
            k = np.asarray(kept)
            ix = np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0])
            iy = np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1])
            inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
            smaller = np.minimum(area[k], area[i])
            ios = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
            clash = (ios >= seam_ios) & (labels[k] == labels[i]) & (tiles[k] != tiles[i])
            if clash.any():
                continue
        kept.append(int(i))
    keep[kept] = True
    return keep
