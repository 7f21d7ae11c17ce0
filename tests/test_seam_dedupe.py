"""Seam de-duplication on dense layouts: the sparse greedy passes against brute force.

``dedupe_seam_boxes`` walks only the candidate pairs that can suppress each other; these tests
hold it to an all-pairs reference written here (two greedy passes in rank order, each NMS-like)
and to the dense torchvision group pass (``_dedupe_group``) it replaced for large groups.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from mgpr.tasks.seam_dedupe import _dedupe_group, dedupe_seam_boxes

THRESHOLDS = [(0.5, 0.5), (0.3, 0.8), (0.0, 1.0), (0.7, 0.25), (1.0, 0.5), (0.5, 1e-9)]


def reference(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> list[bool]:
    """All pairs, rank (not cut, score, area, index): an IoU pass (IoU > nms_iou, same class),
    then an IoS pass over its survivors (IoS >= seam_ios, same class, other tile); a box only
    suppresses while it is kept. Boxes must have a positive area."""
    n = len(boxes)
    area = [float((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]

    def inter(i: int, j: int) -> float:
        w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
        h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
        return float(max(w, 0.0) * max(h, 0.0))

    def iou(i: int, j: int) -> float:
        return inter(i, j) / (area[i] + area[j] - inter(i, j))

    def ios(i: int, j: int) -> float:
        return inter(i, j) / min(area[i], area[j])

    order = sorted(range(n), key=lambda i: (bool(cut[i]), -scores[i], -area[i], i))
    survivors: list[int] = []
    for i in order:
        if not any(labels[k] == labels[i] and iou(k, i) > nms_iou for k in survivors):
            survivors.append(i)
    kept: list[int] = []
    for i in survivors:
        clash = (
            labels[k] == labels[i] and tiles[k] != tiles[i] and ios(k, i) >= seam_ios for k in kept
        )
        if not any(clash):
            kept.append(i)
    keep = [False] * n
    for i in kept:
        keep[i] = True
    return keep


def dense_layout(seed: int) -> tuple[npt.NDArray[np.float64], ...]:
    """A grid of objects that leave a gap, touch or overlap, each seen by 1-3 tiles (some cut).

    Coordinates on a 0.5 px grid; scores with ties; 1-3 classes.
    """
    rng = np.random.default_rng(seed)
    pitch = 8.0
    side = pitch + rng.choice([-1.0, 0.0, 0.0, 0.5, 1.0, 3.0])
    k = int(rng.integers(3, 9))
    starts = np.arange(k) * pitch
    cols, rows = (a.ravel() for a in np.meshgrid(starts, starts))
    objects = np.stack([cols, rows, cols + side, rows + side], axis=1)
    boxes, tiles, cut = [], [], []
    for obj in objects:
        for tile in rng.choice(4, size=int(rng.integers(1, 4)), replace=False):
            box = obj.copy()
            if rng.random() < 0.3:  # a copy cut by its tile's edge on one side
                edge = int(rng.integers(0, 4))
                trim = float(rng.integers(1, int(side))) / 2
                box[edge] += trim if edge < 2 else -trim
            elif rng.random() < 0.3:  # detector jitter
                box = box + rng.choice([-0.5, 0.0, 0.5], size=4)
            boxes.append(box)
            tiles.append(tile)
            cut.append(rng.random() < 0.4)
    n = len(boxes)
    scores = rng.choice([0.6, 0.8, 0.9], n) if seed % 2 else rng.uniform(0, 1, n).round(2)
    labels = rng.integers(0, int(rng.integers(1, 4)), n)
    return (
        np.array(boxes, dtype=np.float64),
        scores.astype(np.float64),
        labels.astype(np.int64),
        np.array(tiles, dtype=np.int64),
        np.array(cut, dtype=bool),
    )


@pytest.mark.parametrize("seed", range(48))
def test_dense_layouts_match_the_all_pairs_reference(seed: int) -> None:
    boxes, scores, labels, tiles, cut = dense_layout(seed)
    nms_iou, seam_ios = THRESHOLDS[seed % len(THRESHOLDS)]
    got = dedupe_seam_boxes(boxes, scores, labels, tiles, cut, nms_iou, seam_ios)
    assert got.tolist() == reference(boxes, scores, labels, tiles, cut, nms_iou, seam_ios)


def test_a_box_suppressed_by_iou_suppresses_nothing() -> None:
    # A removes B (IoU 0.54); B would remove C (0.54), A does not (0.25): C stays.
    boxes = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], dtype=np.float64)
    keep = dedupe_seam_boxes(
        boxes, np.array([0.9, 0.8, 0.7]), np.ones(3, np.int64), np.zeros(3, np.int64),
        np.zeros(3, bool), 0.5, 0.5,
    )  # fmt: skip
    assert keep.tolist() == [True, False, True]


def test_a_box_suppressed_by_ios_suppresses_nothing_there() -> None:
    # A (tile 0) removes B (tile 1) by IoS 0.5; B would remove C (tile 0) by IoS 0.6: C stays.
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [9, 0, 19, 10]], dtype=np.float64)
    keep = dedupe_seam_boxes(
        boxes, np.array([0.9, 0.8, 0.7]), np.ones(3, np.int64), np.array([0, 1, 0]),
        np.zeros(3, bool), 0.5, 0.5,
    )  # fmt: skip
    assert keep.tolist() == [True, False, True]


def test_the_iou_pass_runs_before_the_ios_pass() -> None:
    # A whole box A (tile 1); B, a cut copy from tile 0 ranked second, survives the IoU pass
    # (IoU 0.5, not > 0.5) and removes C there (IoU 0.67) before A removes B by IoS: C is gone,
    # which one combined pass would have kept (A-C: IoU 0.36, same tile).
    boxes = np.array([[0, 0, 20, 10], [10, 0, 20, 10], [12, 0, 22, 10]], dtype=np.float64)
    keep = dedupe_seam_boxes(
        boxes, np.array([0.5, 0.9, 0.8]), np.ones(3, np.int64), np.array([1, 0, 1]),
        np.array([False, True, True]), 0.5, 0.5,
    )  # fmt: skip
    assert keep.tolist() == [True, False, False]


def one_group(seed: int, n: int, spread: float) -> tuple[npt.NDArray[np.float64], ...]:
    """``n`` boxes on a 0.1 px grid far from the origin (their sums round), one class (7),
    plus a box covering them all ranked last: one connected group, as ``_dedupe_group`` sees it.
    """
    rng = np.random.default_rng(seed)
    corner = rng.integers(0, int(spread * 10), (n, 2)) / 10
    size = rng.integers(1, 20, (n, 2)) / 10
    boxes = np.concatenate([corner, corner + size], axis=1) + 1000.3
    cover = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
    boxes = np.vstack([boxes, cover])
    scores = np.append(rng.uniform(0.1, 1, n).round(3), 0.0)
    cut = np.append(rng.random(n) < 0.2, True)
    return boxes, scores, np.full(n + 1, 7, np.int64), rng.integers(0, 3, n + 1), cut


@pytest.mark.parametrize(
    ("nms_iou", "seam_ios"), [(0.5, 0.5), (1 / 3, 0.9), (0.25, 0.6), (0.2, 1.0), (0.5, 0.0)]
)
def test_one_group_matches_the_torchvision_pass_it_replaced(
    nms_iou: float, seam_ios: float
) -> None:
    """Fractional coordinates, a class other than 0: batched_nms offsets the boxes, which rounds
    them; the IoU pass mirrors that. ``seam_ios=0`` takes the dense pass itself."""
    for seed in range(120):
        args = one_group(seed, 30, 3.0)
        got = dedupe_seam_boxes(*args, nms_iou, seam_ios)
        assert got.tolist() == _dedupe_group(*args, nms_iou, seam_ios).tolist(), seed


def test_a_group_over_a_thousand_boxes_matches_the_torchvision_pass() -> None:
    """Above 1000 boxes batched_nms runs class by class without the offset."""
    for seed in range(2):
        args = one_group(seed, 1200, 60.0)
        got = dedupe_seam_boxes(*args, 0.5, 0.5)
        assert got.tolist() == _dedupe_group(*args, 0.5, 0.5).tolist()
