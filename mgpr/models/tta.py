"""Test-time augmentation (``tta=flips|d4``): each tile in several orientations, averaged.

Each view's class probabilities are turned back onto the tile's grid before the average.

Why: aerial and satellite imagery has no "up". A network sees roofs, rows of trees or field
edges in the orientations its training chips had, and its errors depend on them; averaging over
the square's symmetries (``flips``: the tile, mirrored left-right, mirrored top-bottom and both,
4 views; ``d4``: the 8 symmetries of the square, the 4 quarter turns with and without a mirror)
removes that dependence and usually some of the error, at 4x or 8x the network's compute (the
data path, scaling and postprocessing run once).

The views act on the network's input as :meth:`~mgpr.models.base.ModelAdapter.prepare` made it,
(B, C, H, W): a flip or a quarter turn commutes with a per-channel normalisation. Tiles are
square, so every view has the tile's shape (one compiled graph, no recompile). Per-pixel outputs
(B, K, h, w) are turned back before averaging (logits coarser than the tile too: h = w); a
classifier's (B, K) needs nothing turned back. What is averaged is probabilities (softmax; a
binary model's one sigmoid logit as ``[1 - p, p]``), in float32 whatever the autocast dtype, and
the mean goes on as log-probabilities, which every postprocess reads as logits:
``softmax(log p) = p``, so the class is the argmax of the mean probability and ``probabilities``
are that mean.

Detection (:func:`fuse_detections`): each view's boxes are turned back into the tile's frame
(:meth:`View.undo_boxes`) and the union of all views' boxes goes through per-class NMS at
``nms_iou``: an object every view finds is kept once, with its best view's box and score, and
one a view misses is still found in another. What leaves the tile is again one set of boxes in
tile pixels, so the nodata rule, the ``max_detections`` cap and the seam de-duplication work
on it as without ``tta``. ``tta_fusion=wbf`` fuses them by weighted box fusion instead
(:func:`weighted_box_fusion`): an object's box is the score-weighted mean of its views' boxes
(a view-dependent box bias cancels), and its score is scaled by the share of views that found
it (the rule for boxes only some views found).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mgpr.errors import ConfigError
from mgpr.models.base import pooled_features

if TYPE_CHECKING:
    from mgpr.models.base import Detections, InstanceMask, ModelAdapter


@dataclass(frozen=True, slots=True)
class View:
    """One symmetry of the square: a left-right mirror (first), then quarter turns.

    ``quarter_turns`` counts counter-clockwise turns of ``torch.rot90`` over (H, W).
    """

    quarter_turns: int
    mirrored: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view of (..., H, W) ``x``."""
        y = torch.flip(x, dims=(-1,)) if self.mirrored else x
        return torch.rot90(y, self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else y

    def undo(self, y: torch.Tensor) -> torch.Tensor:
        """(..., H, W) ``y`` computed on the view, back on the tile's own grid."""
        z = torch.rot90(y, -self.quarter_turns, dims=(-2, -1)) if self.quarter_turns else y
        return torch.flip(z, dims=(-1,)) if self.mirrored else z

    def undo_boxes(self, boxes: np.ndarray, size: float) -> np.ndarray:
        """(N, 4) ``xyxy`` boxes in the view's pixel-corner frame, back in the tile's own.

        A quarter turn (``torch.rot90`` over (H, W)) takes the tile's point (x, y) to the
        view's (y, S - x), S = ``size``; undone by (x, y) -> (S - y, x), once per turn, then
        the mirror x -> S - x. Corners map to corners, so min/max give the box again.
        """
        x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
        for _ in range(self.quarter_turns):
            x1, y1, x2, y2 = size - y2, x1, size - y1, x2
        if self.mirrored:
            x1, x2 = size - x2, size - x1
        return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)

    def undo_mask(self, crop: InstanceMask, size: int) -> InstanceMask:
        """An object's pixels found on the view (a crop at its window), back on the tile's grid.

        The crop's window goes back as a box does (:meth:`undo_boxes`); its pixels by the
        inverse of :meth:`apply` (a quarter turn back, then the mirror), as for a whole tile.
        """
        from mgpr.models.base import InstanceMask

        h, w = crop.mask.shape
        window = np.array([[crop.col, crop.row, crop.col + w, crop.row + h]], np.float32)
        x0, y0, _x1, _y1 = self.undo_boxes(window, size)[0]
        pixels = np.rot90(crop.mask, -self.quarter_turns) if self.quarter_turns else crop.mask
        if self.mirrored:
            pixels = pixels[:, ::-1]
        return InstanceMask(int(round(y0)), int(round(x0)), np.ascontiguousarray(pixels))


#: The views of each mode, the tile itself first. ``flips``: mirror left-right, mirror
#: top-bottom (a left-right mirror turned twice) and both (a half turn).
VIEWS: dict[str, tuple[View, ...]] = {
    "none": (View(0, False),),
    "flips": (View(0, False), View(0, True), View(2, True), View(2, False)),
    "d4": tuple(View(k, m) for k in range(4) for m in (False, True)),
}


def check_tta_refusal(mode: str, refusal: str | None) -> None:
    """Refuse ``tta=`` before any tile for an adapter with nothing to average.

    ``refusal`` is its :attr:`~mgpr.models.base.ModelAdapter.tta_refusal`.
    """
    if mode != "none" and refusal:
        raise ConfigError(f"tta={mode} averages class probabilities, but {refusal}; unset tta")


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """(B, K[, H, W]) class logits -> float32 probabilities over dim 1 (K = 1: ``[1 - p, p]``)."""
    s = scores.float()
    if s.shape[1] == 1:
        p = torch.sigmoid(s)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(s, dim=1)


def augmented_forward(adapter: ModelAdapter, inputs: torch.Tensor, views: Sequence[View]) -> object:
    """The network's output for ``inputs`` averaged over ``views``, as the adapter returns it.

    An embedder's (``task = "embedding"``) pooled (B, D) features are averaged as they are
    (float32): the mean over the views is a vector that no flip or turn of the tile changes.

    Each view is one forward of the whole batch (memory: one view's activations plus the
    running mean, (B, K, H, W) float32 for a segmenter). Each view is laid out as the input
    was (contiguous or channels-last).
    """
    layout = (
        torch.channels_last
        if inputs.ndim == 4
        and inputs.is_contiguous(memory_format=torch.channels_last)
        and not inputs.is_contiguous()
        else torch.contiguous_format
    )
    total: torch.Tensor | None = None
    for view in views:
        # A quarter turn is a transposed view: laid out as the input was (channels-last for
        # the GPU adapters), not left to the first convolution's choice.
        x = view.apply(inputs).contiguous(memory_format=layout)
        if adapter.task == "embedding":  # a tile's features: nothing on the tile's grid
            p = pooled_features(adapter.forward(x), adapter.name)
        else:
            p = class_probabilities(adapter.class_scores(adapter.forward(x)))
            if p.ndim == 4:
                p = view.undo(p)
        total = p if total is None else total.add_(p)
    assert total is not None
    if adapter.task == "embedding":
        return total.div_(len(views))
    return adapter.with_class_scores(total.div_(len(views)).log_())


def view_inputs(inputs: object, view: View) -> object:
    """The view of the network's input.

    A (B, C, H, W) batch, or the list of (C, H, W) tiles torchvision's detectors take.
    """
    if isinstance(inputs, (list, tuple)):
        return [view.apply(t).contiguous() for t in inputs]
    assert isinstance(inputs, torch.Tensor)
    return view.apply(inputs)


def fuse_detections(
    per_view: Sequence[Sequence[Detections]],
    views: Sequence[View],
    size: int,
    iou: float,
    cap: int | None,
    fusion: str = "nms",
    min_score: float = 0.0,
) -> list[Detections]:
    """Each tile's boxes from every view, back in the tile's frame, merged by per-class NMS.

    ``per_view[v][i]``: tile ``i``'s detections in view ``v``'s frame. The union of the views'
    boxes goes through ``torchvision.ops.batched_nms`` at ``iou`` (the ``nms_iou`` key): a
    box every view found once is kept once, with its best view's box and score (an instance
    segmenter's mask too, turned back: :meth:`View.undo_mask`), so an object a view misses is
    still found where another view sees it. Then the ``cap`` best scores,
    the larger box first among equal scores (``max_detections``; None: every box).

    ``fusion="wbf"`` (``tta_fusion=wbf``): :func:`weighted_box_fusion` in place of the NMS,
    so each object's box is the score-weighted mean of its views' boxes; its score, scaled
    down for objects some views missed, is held to ``min_score`` (``score_threshold``) again,
    as every view's boxes were.
    """
    from torchvision.ops import batched_nms

    from mgpr.models.base import Detections

    out: list[Detections] = []
    for i in range(len(per_view[0])):
        boxes = np.concatenate(
            [
                view.undo_boxes(dets[i].boxes, size)
                for view, dets in zip(views, per_view, strict=True)
            ]
        )
        scores = np.concatenate([dets[i].scores for dets in per_view])
        labels = np.concatenate([dets[i].labels for dets in per_view])
        masks = None
        if all(dets[i].masks is not None for dets in per_view):  # an instance segmenter
            masks = [
                view.undo_mask(m, size)
                for view, dets in zip(views, per_view, strict=True)
                for m in dets[i].masks or ()
            ]
        if len(scores) and fusion == "wbf":
            boxes, scores, labels, picked = weighted_box_fusion(
                boxes, scores, labels, iou, len(views)
            )
            kept = scores >= min_score
            boxes, scores, labels, picked = boxes[kept], scores[kept], labels[kept], picked[kept]
            masks = None if masks is None else [masks[int(k)] for k in picked]
            order = np.lexsort(((boxes[:, 0] - boxes[:, 2]) * (boxes[:, 3] - boxes[:, 1]), -scores))
            boxes, scores, labels = boxes[order], scores[order], labels[order]
            masks = None if masks is None else [masks[int(k)] for k in order]
        elif len(scores):
            keep = batched_nms(
                torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou
            ).numpy()
            # best score first, equal scores the larger box first (the reference detector
            # scores every box 1.0 and keeps its largest under the cap)
            area = (boxes[keep, 2] - boxes[keep, 0]) * (boxes[keep, 3] - boxes[keep, 1])
            keep = keep[np.lexsort((-area, -scores[keep]))]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            masks = None if masks is None else [masks[int(k)] for k in keep]
        fused = Detections(
            boxes=boxes, scores=scores, labels=labels, masks=None if masks is None else tuple(masks)
        )
        out.append(fused.best(cap) if cap is not None else fused)
    return out


def weighted_box_fusion(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, views: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted box fusion (Solovyev et al., 2019) of one tile's boxes from ``views`` views.

    The clusters are those per-class NMS at ``iou`` forms: each box it keeps, and every box of
    its class that overlaps it at IoU > ``iou`` and scores lower (one overlapping several kept
    boxes joins the one it overlaps most). A cluster's box is the score-weighted mean of its
    members' corners, its score the mean of their scores times ``min(members, views) /
    views``: an object every view found keeps its score, one that a single view of 8 found
    keeps an eighth of it (NMS would keep it whole). The paper grows each cluster against its
    running fused box, box by box; NMS's clusters are the same for boxes that agree to within
    ``iou`` and come from one vectorised pass (8 views x 100 boxes: 5-6 ms on this 2-core VM,
    against 67 ms for the box-by-box loop and 0.8 ms for the NMS alone).

    Args:
        boxes: (N, 4) ``xyxy`` in the tile's frame.
        scores: (N,) the boxes' scores.
        labels: (N,) their class ids (boxes fuse within a class only).
        iou: the ``nms_iou`` key.
        views: how many views the boxes came from.

    Returns:
        The fused boxes (float32), scores (float32), labels (int64), and each cluster's best
        member's index into the input (its mask, an instance segmenter's, is the object's).
    """
    from torchvision.ops import batched_nms, box_iou

    b = torch.from_numpy(np.ascontiguousarray(boxes, np.float32))
    s = torch.from_numpy(np.ascontiguousarray(scores, np.float32))
    lab = torch.from_numpy(np.ascontiguousarray(labels, np.int64))
    keep = batched_nms(b, s, lab, iou)  # falling score order
    overlap = box_iou(b, b[keep])  # (N, K)
    overlap[lab[:, None] != lab[keep][None, :]] = -1.0
    overlap[keep, torch.arange(len(keep))] = 2.0  # a kept box is its own cluster's
    best, cluster = overlap.max(dim=1)
    member = best > iou  # every box NMS dropped overlaps a kept box of its class above iou
    weights = (s * member).double()
    k = len(keep)
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, weights)
    fused = (
        torch.zeros(k, 4, dtype=torch.float64).index_add_(0, cluster, b.double() * weights[:, None])
        / total.clamp_min(1e-12)[:, None]
    )
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, member.double())
    mean_score = total / count.clamp_min(1.0)
    fused_scores = mean_score * torch.clamp(count, max=views) / views
    return (
        fused.float().numpy().reshape(-1, 4),
        fused_scores.float().numpy(),
        lab[keep].numpy().astype(np.int64),
        keep.numpy().astype(np.int64),
    )
