"""The null model: near-zero compute, for measuring the pipeline's own overhead.

Each tile is "classified" into one class, ``mean_brightness``, with score = mean scaled value (in
[0, 1]: value_range applied; uint8: value / 255) over all bands (on a 1-in-64 pixel grid),
computed on the device. A run with ``model=null`` shows
how fast reading,
transfer, writing and the report go when the network costs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mgpr.errors import ModelError
from mgpr.models.base import Classification, ModelAdapter
from mgpr.models.weights import require_no_weights


class MeanBrightness(torch.nn.Module):
    """(B, C, H, W) float32 in [0, 1] -> (B,) float32 mean value, in [0, 1].

    The mean is taken over every 8th row and column (1 pixel in 64): a full-resolution
    reduction costs ~7 ms per batch of eight 512 px tiles on a CPU core, which
    is not "near zero" next to the pipeline being measured; the subsample costs ~0.15 ms.
    On a CPU the mean is numpy's (one thread): torch would wake its intra-op threads for it,
    and with the DataLoader workers busy on every core the main process then waited several ms
    per batch for a second core (measured: 0.4 ms vs 6-8 ms CPU per batch of eight 512 px
    tiles, 2-core VM).
    """

    stride_px = 8

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the per-tile mean over bands and a 1-in-64 pixel grid."""
        sub = images[:, :, :: self.stride_px, :: self.stride_px]
        if sub.device.type == "cpu":
            return torch.from_numpy(sub.numpy().mean(axis=(1, 2, 3), dtype=np.float32))
        return sub.mean(dim=(1, 2, 3), dtype=torch.float32)


class NullAdapter(ModelAdapter):
    """Near-zero-cost classifier (one class, mean brightness); ``in_bands = 0`` (any)."""

    def __init__(self) -> None:
        super().__init__(
            name="null",
            task="classification",
            categories=("mean_brightness",),
            in_bands=0,
            random_weights=False,
            weights_id="none",
            module=MeanBrightness(),
        )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pass the scaled (B, C, H, W) float32 tiles through unchanged."""
        return images

    tta_refusal = (
        "model=null returns one mean brightness per tile (a data-path test, the same in every view)"
    )

    def class_scores(self, raw: Any) -> torch.Tensor:
        """Refused: a mean brightness is no class probability to average (``tta=``)."""
        raise ModelError(f"tta= averages class probabilities, but {self.tta_refusal}; unset tta")

    def postprocess(self, raw: Any, tile_size: int) -> list[Classification]:
        """One :class:`Classification` per tile: class 0 with score = the mean scaled value."""
        scores = raw.float().cpu().numpy().astype(np.float32, copy=False)
        return [
            Classification(class_ids=np.zeros(1, np.int64), scores=scores[i : i + 1])
            for i in range(scores.shape[0])
        ]


def build_null(weights: str = "none") -> NullAdapter:
    """Build the null model; it has no weights (``weights`` must be none or DEFAULT)."""
    require_no_weights("null", weights)
    return NullAdapter()
