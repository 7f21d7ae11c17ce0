"""Seam de-duplication on dense objects that leave a gap, touch, or overlap their neighbours.

What it measures: ``benchmarks/README.md``; figures: the main README ("Benchmarks").

A square grid of square objects (``--pitch`` px apart, tree crowns, panel rows, parked cars)
over a ``--size`` px raster tiled like a run (``--tile``, ``--overlap``): each tile records the
objects it sees, clipped to its window; the boxes near an inner tile edge (within ``overlap``
px: the detection task's seam strip) go through
:func:`mgpr.tasks.seam_dedupe.dedupe_seam_boxes`, as in the merge. Three layouts, the same grid:

* ``gap``: objects ``pitch - 1`` px wide (1 px between neighbours);
* ``touching``: ``pitch`` px (neighbours share an edge: shapely ``intersects``);
* ``overlap``: ``pitch + 1`` px (neighbours overlap by 1 px).

``new`` is the module as it is; ``dense`` is the pre-fix algorithm (each connected group of
intersecting same-class boxes of more than two through :func:`_dedupe_group`, a torchvision
``batched_nms`` call and a scan of the growing kept list, both quadratic in the group), rebuilt
here from the module's own group pass. Both run on the same boxes in the same process, best of
``--repeat``; ``same`` says whether their keep masks are identical. ``dense`` is skipped above
``--dense-max`` seam boxes (at 4096 px it takes tens of seconds per call on a 2-core VM).

    uv run python benchmarks/seam_dedupe.py --size 4096
    uv run python benchmarks/seam_dedupe.py --size 16384 --dense-max 0   # new only, ~1M boxes
    uv run python benchmarks/seam_dedupe.py --quick
"""

from __future__ import annotations

import argparse

import numpy as np
import numpy.typing as npt
from synthetic import best_of

from mgpr.tasks.seam_dedupe import (
    _dedupe_pairs,
    dedupe_dense_groups,
    dedupe_seam_boxes,
    intersecting_groups,
)

NMS_IOU, SEAM_IOS = 0.5, 0.5  # the defaults (mgpr/conf/schema.py)
LAYOUTS = {"gap": -1.0, "touching": 0.0, "overlap": 1.0}  # object size - pitch, px

Arrays = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.bool_],
]


def seam_boxes(size: int, pitch: float, side: float, tile: int, overlap: int, seed: int) -> Arrays:
    """The seam boxes of a grid of ``side`` px objects every ``pitch`` px, as the tiles saw them.

    Returns boxes (N, 4) xyxy raster pixels, scores, labels (one class), tile ids and cut flags
    (the box touches an inner edge of its tile, within 1 px).
    """
    rng = np.random.default_rng(seed)
    starts = np.arange(2.0, size - side, pitch)
    cols, rows = (a.ravel() for a in np.meshgrid(starts, starts))
    objects = np.stack([cols, rows, cols + side, rows + side], axis=1)
    stride = tile - overlap
    n_tiles = int(np.ceil((size - tile) / stride)) + 1
    parts, tiles, cuts = [], [], []
    for tile_row in range(n_tiles):
        for tile_col in range(n_tiles):
            col0, row0 = tile_col * stride, tile_row * stride
            col1, row1 = min(col0 + tile, size), min(row0 + tile, size)
            seen = (
                (objects[:, 2] > col0)
                & (objects[:, 0] < col1)
                & (objects[:, 3] > row0)
                & (objects[:, 1] < row1)
            )
            b = objects[seen].copy()
            b[:, [0, 2]] = b[:, [0, 2]].clip(col0, col1)
            b[:, [1, 3]] = b[:, [1, 3]].clip(row0, row1)
            b = b[((b[:, 2] - b[:, 0]) > 2) & ((b[:, 3] - b[:, 1]) > 2)]
            seam = np.zeros(len(b), dtype=bool)
            cut = np.zeros(len(b), dtype=bool)
            if col0 > 0:
                seam |= b[:, 0] <= col0 + overlap
                cut |= b[:, 0] <= col0 + 1
            if row0 > 0:
                seam |= b[:, 1] <= row0 + overlap
                cut |= b[:, 1] <= row0 + 1
            if col1 < size:
                seam |= b[:, 2] >= col1 - overlap
                cut |= b[:, 2] >= col1 - 1
            if row1 < size:
                seam |= b[:, 3] >= row1 - overlap
                cut |= b[:, 3] >= row1 - 1
            parts.append(b[seam])
            cuts.append(cut[seam])
            tiles.append(np.full(int(seam.sum()), tile_row * n_tiles + tile_col, dtype=np.int64))
    boxes = np.concatenate(parts)
    scores = 0.5 + 0.5 * rng.random(len(boxes))
    labels = np.ones(len(boxes), dtype=np.int64)
    return boxes, scores, labels, np.concatenate(tiles), np.concatenate(cuts)


def dense_dedupe(
    boxes: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    tiles: npt.NDArray[np.int64],
    cut: npt.NDArray[np.bool_],
    nms_iou: float,
    seam_ios: float,
) -> npt.NDArray[np.bool_]:
    """The pre-fix ``dedupe_seam_boxes``: every connected group of > 2 boxes through the dense
    :func:`_dedupe_group` (quadratic in the group), groups of two vectorised."""
    keep = np.ones(len(boxes), dtype=bool)
    if len(boxes) < 2:
        return keep
    left, right, group, size = intersecting_groups(boxes, labels)
    two = size[group[left]] == 2
    pairs = np.stack([left[two], right[two]], axis=1).astype(np.int64)
    keep[_dedupe_pairs(pairs, boxes, scores, tiles, cut, nms_iou, seam_ios)] = False
    dedupe_dense_groups(keep, group, boxes, scores, labels, tiles, cut, nms_iou, seam_ios)
    return keep


def largest_group(boxes: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> int:
    """Boxes in the largest connected group of intersecting same-class boxes."""
    return int(intersecting_groups(boxes, labels)[3].max())


def main() -> None:
    """Print one row per layout: seam boxes, largest group, removed, new and dense seconds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="raster side, px")
    ap.add_argument("--pitch", type=float, default=20.0, help="object spacing, px")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dense-max", type=int, default=70_000, help="skip dense above, seam boxes")
    ap.add_argument("--quick", action="store_true", help="2048 px, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = 2048, 1
    print(
        f"raster {args.size} px, tile {args.tile}, overlap {args.overlap}, pitch {args.pitch} px, "
        f"nms_iou={NMS_IOU} seam_ios={SEAM_IOS}, best of {args.repeat}"
    )
    print("layout    seam boxes  largest group  removed   new s  dense s  dense/new  same")
    for name, extra in LAYOUTS.items():
        arrays = seam_boxes(
            args.size, args.pitch, args.pitch + extra, args.tile, args.overlap, seed=0
        )
        n = len(arrays[0])
        t_new, keep = best_of(
            lambda a=arrays: dedupe_seam_boxes(*a, NMS_IOU, SEAM_IOS), args.repeat
        )
        dense_s = ratio = same = "skipped"
        if n <= args.dense_max:
            t_dense, keep_dense = best_of(
                lambda a=arrays: dense_dedupe(*a, NMS_IOU, SEAM_IOS), args.repeat
            )
            dense_s, ratio = f"{t_dense:7.2f}", f"{t_dense / t_new:8.1f}x"
            same = "yes" if np.array_equal(keep, keep_dense) else "NO"
        group = largest_group(arrays[0], arrays[2])
        print(
            f"{name:9} {n:10,d} {group:14,d} {n - int(keep.sum()):8,d} {t_new:7.2f}"
            f"  {dense_s:>7}  {ratio:>9}  {same}"
        )


if __name__ == "__main__":
    main()
