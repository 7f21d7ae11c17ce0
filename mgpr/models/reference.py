"""The reference detector: finds bright rectangles, for checking the pipeline end to end.

This is NOT a trained model and knows nothing about plants. It exists so a run over the
project's synthetic test images (``mgpr-test-image``: background <= 200/255 of the value range,
planted objects >= 245/255 in every band, whatever the dtype) has an exactly known answer, which
lets tests check tiling, sharding, georeferencing and seam de-duplication without any weights.
It works on the scaled input (``value_range`` applied; bright = >= 0.96 of the range in every
band, i.e. uint8 >= 245), so it runs on any dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from mgpr.models.amp import fp32
from mgpr.models.base import Detections, ModelAdapter
from mgpr.models.weights import require_no_weights

#: A pixel is "bright" when every band is >= 0.96 of its value range (scaled input in [0, 1]).
#: The constant sits 2e-4 below 0.96 so that a value exactly at 0.96 of its range stays bright
#: whatever the float rounding of ``(x - lo) / (hi - lo)`` (a uint16 range of 0..100 puts 96 there);
#: for uint8 it is x >= 245 (244/255 = 0.9569, 245/255 = 0.9608: float rounding never moves a
#: level across it). Test images put backgrounds at <= 200/255 and objects at >= 245/255 of the
#: range.
BRIGHT_THRESHOLD = 0.9598
#: Components with fewer pixels than this are dropped (noise).
MIN_AREA_PX = 4
#: Boxes kept per tile by default (the same default as Faster R-CNN's).
MAX_DETECTIONS = 100


class BrightMask(torch.nn.Module):
    """(B, C, H, W) float in [0, 1] -> (B, H, W) bool, True where ALL bands >= ``threshold``.

    A real (if tiny) module so the pipeline can move it to the device like any network; the
    threshold is a buffer.
    """

    threshold: torch.Tensor

    def __init__(self, threshold: float = BRIGHT_THRESHOLD) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the (B, H, W) bool mask of bright pixels (computed on the images' device)."""
        return (images >= self.threshold).all(dim=1)


class ReferenceDetectorAdapter(ModelAdapter):
    """Bright-rectangle detector (rule based, not trained); see the module docstring.

    Boxes are the bounding boxes of 4-connected components of the bright mask, as half-open
    pixel-corner ``xyxy`` = ``(col_min, row_min, col_max, row_max)`` in the tile, score 1.0,
    label 1 (``"bright_rectangle"``). ``in_bands = 0``: any band count works (all bands must be
    bright). At most ``max_detections`` boxes per tile: the largest components (pixel count),
    ties in raster order. The mask is computed with autocast off and boxes are integer pixel
    corners from the CPU, so they are exact whatever the run's precision.
    """

    def __init__(
        self,
        *,
        min_area_px: int = MIN_AREA_PX,
        threshold: float = BRIGHT_THRESHOLD,
        max_detections: int = MAX_DETECTIONS,
    ) -> None:
        super().__init__(
            name="reference",
            task="detection",
            categories=("background", "bright_rectangle"),
            in_bands=0,
            random_weights=False,
            weights_id="none",
            module=BrightMask(threshold),
        )
        self.min_area_px = min_area_px
        self.max_detections = max_detections

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The bright mask, with autocast off (the same rule as every detector's boxes)."""
        with fp32(inputs.device.type):
            return self._network(inputs)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pass the scaled (B, C, H, W) tiles through unchanged (the mask is the forward pass)."""
        return images

    def postprocess(self, raw: Any, tile_size: int) -> list[Detections]:
        """Label connected components of each (H, W) mask on the CPU (scipy), one box each.

        Args:
            raw: (B, H, W) bool mask from the module (any device; 1 byte per pixel crosses).
            tile_size: tile edge in pixels (boxes lie in ``0..tile_size``).
        """
        masks = raw.cpu().numpy()
        out: list[Detections] = []
        for mask in masks:
            labelled, n = ndimage.label(mask)  # default structure: 4-connectivity in 2-D
            if n == 0:
                out.append(Detections.empty())
                continue
            areas = np.bincount(labelled.ravel(), minlength=n + 1)
            found = [
                (int(areas[i]), (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
                for i, sl in enumerate(ndimage.find_objects(labelled), start=1)
                if sl is not None and areas[i] >= self.min_area_px
            ]
            if len(found) > self.max_detections:  # the largest; a stable sort keeps ties ordered
                found = sorted(found, key=lambda f: -f[0])[: self.max_detections]
            boxes = [box for _, box in found]
            k = len(boxes)
            out.append(
                Detections(
                    boxes=np.asarray(boxes, np.float32).reshape(k, 4),
                    scores=np.ones(k, np.float32),
                    labels=np.ones(k, np.int64),
                )
            )
        return out


def build_reference(
    weights: str = "none", *, max_detections: int = MAX_DETECTIONS
) -> ReferenceDetectorAdapter:
    """Build the reference detector; it has no weights (``weights`` must be none or DEFAULT).

    Args:
        weights: ``none`` or ``DEFAULT`` (both mean: no weights).
        max_detections: boxes kept per tile at most (the largest components).
    """
    require_no_weights("reference", weights)
    return ReferenceDetectorAdapter(max_detections=max_detections)
