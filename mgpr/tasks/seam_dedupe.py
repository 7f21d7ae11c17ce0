"""Cross-tile de-duplication of detection boxes found twice along tile seams (one raster).

Moved from the first edition's shard module (its home is the detection task's,
:mod:`mgpr.tasks.detection`). The rule is unchanged; since the seam fix for dense objects the
greedy passes run over the sparse list of box pairs that can suppress each other instead of
over whole groups of intersecting boxes (see :func:`dedupe_seam_boxes`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# torchvision's batched_nms (0.29, CPU) offsets each class's boxes by
# ``label * (max coordinate + 1)`` and runs one nms when the boxes tensor has at most this many
# elements (4 per box), and runs nms class by class on the unshifted boxes above it. The offset
# can round fractional coordinates, so the sparse pass mirrors it to give the same IoUs.
_TORCHVISION_TRICK_MAX_NUMEL = 4000


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

    Two boxes of the same class are the same object when their IoU > ``nms_iou`` (strict, as
    torchvision's ``batched_nms``), or, coming from *different* tiles, when their intersection
    over the smaller box's area (IoS) >= ``seam_ios``: a box cut by a tile edge lies inside the
    whole box that the neighbouring tile saw, so its IoU can be low while its IoS is ~1 (the case
    SAHI and GeoDeep handle the same way). Boxes are ranked by (not cut first, score, area,
    index), so the whole box wins over its truncated copy. Pixel frame and map frame give the
    same answer: an affine map scales every area by the same factor, so IoU and IoS are
    unchanged.

    Two greedy passes in rank order, each NMS-like (a suppressed box suppresses nothing):
    first by IoU, then by IoS among the IoU survivors. A box that the IoS pass removes has
    still removed, in the IoU pass, the boxes it out-ranked there.

    Cost: the candidate pairs are the intersecting (edge-touching included) same-class boxes,
    from one shapely STRtree query; their connected groups come from scipy. A group of two
    is decided in one vectorised step. In larger groups only the pairs over a threshold can
    suppress each other, since both rules need a positive intersection when
    ``nms_iou >= 0`` and ``seam_ios > 0``; each pass walks those pairs once, ordered by their
    higher-ranked box: O(boxes + pairs) after sorting, however large a group grows (touching
    tree crowns or panel rows join whole seams into one group). With ``seam_ios <= 0`` or
    ``nms_iou < 0`` a box can suppress one it does not even touch within its group, so such
    groups take the dense pass (:func:`_dedupe_group`, quadratic in the group).

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
    n = len(boxes)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    left, right, group, size = intersecting_groups(boxes, labels)
    pair_size = size[group[left]]
    two = pair_size == 2  # a group of two holds exactly one pair
    pairs = np.stack([left[two], right[two]], axis=1).astype(np.int64)
    keep[_dedupe_pairs(pairs, boxes, scores, tiles, cut, nms_iou, seam_ios)] = False
    big = pair_size > 2
    if not big.any():
        return keep
    if nms_iou < 0 or seam_ios <= 0:
        dedupe_dense_groups(keep, group, boxes, scores, labels, tiles, cut, nms_iou, seam_ios)
        return keep
    keep[
        _dedupe_sparse(
            left[big], right[big], group, size, boxes, scores, labels, tiles, cut, nms_iou, seam_ios
        )
    ] = False
    return keep


def intersecting_groups(
    boxes: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int64]
]:
    """The same-class intersecting pairs (edge-touching counts) and their connected groups.

    Returns ``(left, right, group, size)``: the pairs (``left < right``), each box's group and
    each group's number of boxes.
    """
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(boxes)
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (left < right) & (labels[left] == labels[right])
    left, right = left[pair], right[pair]
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    n_groups, group = connected_components(graph, directed=False)
    return left, right, group, np.bincount(group, minlength=n_groups)


def dedupe_dense_groups(
    keep: npt.NDArray[np.bool_],
    group: npt.NDArray[np.int32],
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> None:
    """``keep`` of every group of more than two boxes from the dense :func:`_dedupe_group`.

    In place; quadratic in each group (``seam_ios <= 0`` or ``nms_iou < 0``, and the
    benchmark's "before").
    """
    order = np.argsort(group, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(group[order])) + 1):
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


def _dedupe_sparse(
    a: npt.NDArray[np.int64],
    b: npt.NDArray[np.int64],
    group: npt.NDArray[np.int32],
    size: npt.NDArray[np.int64],
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.int64]:
    """Indexes suppressed in groups of more than two boxes, over their candidate pairs.

    The same result as :func:`_dedupe_group` on each group (needs ``nms_iou >= 0`` and
    ``seam_ios > 0``): a box is suppressed in a pass when a box ranked above it that the pass
    kept suppresses it, so only the pairs over the pass's threshold matter, walked once in the
    order of their higher-ranked box (every pair into a box comes before the pairs out of it).

    ``a``, ``b``: (P,) the candidate pairs (same class, intersecting, in one group of more than
    two boxes); ``group``: (N,) each box's connected group; ``size``: (G,) each group's number
    of boxes; the rest as :func:`dedupe_seam_boxes`. Returns (S,) indexes into ``boxes``.
    """
    n = len(boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # The rank of _dedupe_group; global, which orders every group's boxes as it does.
    order = np.lexsort((np.arange(n), -area, -scores, cut.astype(np.int64)))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    hi = np.where(rank[a] < rank[b], a, b)
    lo = np.where(rank[a] < rank[b], b, a)
    # IoU pass: torchvision's arithmetic, on the boxes as batched_nms offsets them.
    nms_boxes = _batched_nms_boxes(boxes, labels, group, size)
    nms_area = (nms_boxes[:, 2] - nms_boxes[:, 0]) * (nms_boxes[:, 3] - nms_boxes[:, 1])
    iou, _ = pair_overlaps(nms_boxes, nms_area, hi, lo)
    over = iou.astype(np.float64) > nms_iou  # the C++ kernel compares in double
    gone = _greedy(hi[over], lo[over], rank, n)
    # IoS pass among the IoU survivors, with _dedupe_group's numpy arithmetic.
    _, ios = pair_overlaps(boxes, area, hi, lo)
    clash = (ios >= seam_ios) & (tiles[hi] != tiles[lo]) & ~gone[hi] & ~gone[lo]
    gone |= _greedy(hi[clash], lo[clash], rank, n)
    return np.flatnonzero(gone).astype(np.int64)


def _batched_nms_boxes(
    boxes: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    group: npt.NDArray[np.int32],
    size: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """The boxes torchvision's ``batched_nms`` hands to ``nms`` when called on each group.

    A group of one class with at most ``_TORCHVISION_TRICK_MAX_NUMEL / 4`` boxes is offset by
    ``label * (the group's max coordinate + 1)`` (in the boxes' dtype); larger ones are not.
    """
    row_max = boxes.max(axis=1)
    group_max = np.full(len(size), -np.inf, dtype=boxes.dtype)
    np.maximum.at(group_max, group, row_max)
    one = np.ones(1, dtype=boxes.dtype)
    offset = labels.astype(boxes.dtype) * (group_max[group] + one)
    trick = 4 * size[group] <= _TORCHVISION_TRICK_MAX_NUMEL
    shifted: npt.NDArray[np.float64] = np.where(trick[:, None], boxes + offset[:, None], boxes)
    return shifted


def _greedy(
    hi: npt.NDArray[np.int64], lo: npt.NDArray[np.int64], rank: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.bool_]:
    """(N,) True where a greedy pass suppresses: ``hi[k]`` removes ``lo[k]`` unless removed.

    ``rank[hi] < rank[lo]`` for every pair. Walking the pairs by the rank of ``hi`` reaches
    a box's own pairs after every pair that could remove it, so its state is final by then.
    """
    gone = bytearray(n)
    walk = np.argsort(rank[hi], kind="stable")
    for h, low in zip(hi[walk].tolist(), lo[walk].tolist(), strict=True):
        if not gone[h]:
            gone[low] = 1
    return np.frombuffer(bytes(gone), dtype=np.uint8).astype(bool)


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
    """Greedy IoU (torchvision) then IoS suppression over one group; see dedupe_seam_boxes.

    Dense: quadratic in the group (one batched_nms call, then each IoU survivor against every
    box kept so far). Used for groups of more than two boxes when ``seam_ios <= 0`` or
    ``nms_iou < 0`` (a box can then suppress one it does not touch); otherwise
    :func:`_dedupe_sparse` gives the same result, and the tests check it against this.
    """
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
