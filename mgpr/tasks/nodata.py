"""Detections in nodata are dropped: a box whose centre lies on an invalid pixel is not reported.

The model's input is filled with 0 where the tile is invalid (:mod:`mgpr.data.masking`), which
keeps a rule-based detector quiet there; a learned one may still put a box on the filled area
or on its edge. The rule here is the tile's validity mask at the box's CENTRE, in the TILE pixel
frame the adapter reports boxes in (half-open pixel corners; the centre ``(x, y)`` lies in pixel
``(floor(y), floor(x))``, clipped into the tile). An object partly over nodata whose centre is on
valid pixels is kept (its box may reach into the nodata); classification is untouched (a tile's
footprint is its valid window, the model saw the filled pixels). A segmentation tile keeps
its mask (:attr:`ClassMap.valid`): its invalid pixels are nodata in the class map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mgpr.models.base import Classification, ClassMap, Detections

Result = Detections | Classification | ClassMap


def drop_masked_detections(det: Detections, valid: np.ndarray) -> Detections:
    """The detections of one tile whose box centre lies on a valid pixel of ``valid``.

    Args:
        det: the adapter's detections, boxes ``xyxy`` = ``(col_min, row_min, col_max, row_max)``
            in TILE pixel corner coordinates.
        valid: (H, W) validity of the tile's pixels, nonzero = valid (GDAL's 255/0 or bool).

    Returns:
        ``det`` itself when every box is kept, else a new :class:`Detections` with the boxes,
        scores and labels of the kept ones in their order. A box with a non-finite centre is
        kept (it lies on no pixel; what to make of it is not this rule's business).
    """
    if len(det) == 0:
        return det
    h, w = valid.shape
    cx = (det.boxes[:, 0] + det.boxes[:, 2]) * np.float32(0.5)
    cy = (det.boxes[:, 1] + det.boxes[:, 3]) * np.float32(0.5)
    finite = np.isfinite(cx) & np.isfinite(cy)
    col = np.clip(np.floor(np.where(finite, cx, 0)), 0, w - 1).astype(np.intp)
    row = np.clip(np.floor(np.where(finite, cy, 0)), 0, h - 1).astype(np.intp)
    keep = (valid[row, col] != 0) | ~finite
    if keep.all():
        return det
    return det.take(keep)


def drop_masked(
    results: Sequence[Result], masks: np.ndarray, positions: Sequence[int]
) -> list[Result]:
    """Apply each tile's validity mask to its record (detections dropped, class maps marked).

    :func:`drop_masked_detections` on each tile's :class:`Detections`; a :class:`ClassMap` gets
    the tile's validity (its invalid pixels become nodata in the class map); others unchanged.

    Args:
        results: one record per predicted tile, in the order of ``positions``.
        masks: (B, H, W) validity of the whole batch (host memory).
        positions: each result's tile position in the batch.
    """
    out: list[Result] = []
    for res, pos in zip(results, positions, strict=True):
        if isinstance(res, Detections):
            out.append(drop_masked_detections(res, masks[pos]))
        elif isinstance(res, ClassMap):
            out.append(dataclasses.replace(res, valid=masks[pos] != 0))
        else:
            out.append(res)
    return out
