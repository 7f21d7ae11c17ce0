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
are that mean. Detection is not offered: boxes from several views need a fusion rule of their
own (weighted box fusion, or NMS across views), which would change what the seam
de-duplication sees; the refusal says so before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mgpr.errors import ConfigError

if TYPE_CHECKING:
    from mgpr.models.base import ModelAdapter


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


#: The views of each mode, the tile itself first. ``flips``: mirror left-right, mirror
#: top-bottom (a left-right mirror turned twice) and both (a half turn).
VIEWS: dict[str, tuple[View, ...]] = {
    "none": (View(0, False),),
    "flips": (View(0, False), View(0, True), View(2, True), View(2, False)),
    "d4": tuple(View(k, m) for k in range(4) for m in (False, True)),
}


def check_tta_task(mode: str, task: str, model_name: str, refusal: str | None = None) -> None:
    """Refuse test-time augmentation for detection (before any weights are fetched).

    ``refusal``: the built adapter's own reason it has nothing to average
    (:attr:`~mgpr.models.base.ModelAdapter.tta_refusal`), or None.
    """
    if mode != "none" and refusal:
        raise ConfigError(f"tta={mode} averages class probabilities, but {refusal}; unset tta")
    if mode != "none" and task == "detection":
        raise ConfigError(
            f"tta={mode} averages class probabilities, which model={model_name} (detection) "
            "does not give: boxes from several views would need a fusion rule of their own; "
            "unset tta (it is for segmentation and classification models)"
        )


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """(B, K[, H, W]) class logits -> float32 probabilities over dim 1 (K = 1: ``[1 - p, p]``)."""
    s = scores.float()
    if s.shape[1] == 1:
        p = torch.sigmoid(s)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(s, dim=1)


def augmented_forward(adapter: ModelAdapter, inputs: torch.Tensor, views: Sequence[View]) -> object:
    """The network's output for ``inputs`` averaged over ``views``, as the adapter returns it.

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
        p = class_probabilities(adapter.class_scores(adapter.forward(x)))
        if p.ndim == 4:
            p = view.undo(p)
        total = p if total is None else total.add_(p)
    assert total is not None
    return adapter.with_class_scores(total.div_(len(views)).log_())
