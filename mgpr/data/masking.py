"""Invalid pixels of the model's input, filled on the device after value scaling.

A tile that is partly nodata (nodata value, NaN, internal/external mask, alpha, or past the
raster's edge) reaches the device with its validity mask (``batch["mask"]``, (B, H, W) uint8,
255 valid, 0 invalid; :mod:`mgpr.data.dataset`). Whatever the file holds there (a white 255
nodata, the image under a mask, NaN) must not reach the model, so after
:class:`~mgpr.data.scaling.ValueScaler` and before the adapter's own normalisation every band of
an invalid pixel becomes :data:`FILL_VALUE`.

Why 0 and not the band mean: 0 is what the pixels past a raster's edge already are (zero padding,
which every model here sees at every raster edge), so a nodata edge looks like a raster edge;
it is the bottom of the value range ("no signal"), never bright, so no detector finds objects in
it; it needs no statistic (a per-raster mean is one more pass and one more thing to record for
a resume, a per-tile mean would move with the tile's content); and it means the same for
raw-input models (``input_range="raw"``), which get 0 too. The cost: after ImageNet
normalisation 0 is a dark value, so a model may see an edge along the nodata boundary, as it
does along the raster's edge.
"""

from __future__ import annotations

import torch

#: What every band of an invalid pixel becomes, in the scaled [0, 1] input (or raw values).
FILL_VALUE = 0.0


def fill_invalid(
    x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Set every band of the invalid pixels of ``x`` to :data:`FILL_VALUE`, in place.

    Args:
        x: (K, C, H, W) float32 model input (scaled), on the device.
        mask: (B, H, W) uint8 validity of the whole batch (0 = invalid), on ``x``'s device;
            None = every pixel valid (``x`` returned as is).
        keep: int64 positions of the K tiles of ``x`` in the batch (None: K = B, all).

    Returns:
        ``x``.
    """
    if mask is None:
        return x
    valid = mask if keep is None else mask[keep]
    return x.masked_fill_(valid.eq(0).unsqueeze(1), FILL_VALUE)
