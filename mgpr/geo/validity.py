"""Where a raster holds data: the one validity rule for tiles, previews and ``value_range=auto``.

GDAL's rule (RFC 15) as rasterio's ``dataset_mask`` applies it goes wrong for two layouts real
producers write:

* an **alpha band plus a nodata value** (an RGBA export whose writer also set nodata=255 or 0):
  GDAL lets nodata shadow the alpha band, and rasterio then takes band 4's nodata mask as the
  dataset's, so alpha=255 (opaque) equal to nodata=255 made every valid pixel invalid and the
  transparent ones valid; on grey + alpha the alpha band was compared with nodata like imagery;
* **four bands whose first is red** (RGB + NIR) with a nodata value: rasterio takes band 4's
  nodata mask alone, so water (NIR = 0) over valid red, green and blue was dropped.

Here, in order: a mask band (internal or ``.msk``) is the mask; else an alpha band is (valid
where alpha > 0; a nodata value beside it is ignored, since alpha is the more specific of the
two); else a pixel is valid where ANY band differs from its nodata value (every band of the
file, as GDAL ORs them); else every pixel is valid. Values: uint8, 0 invalid, 255 valid (a
resampled read of a mask band may hold levels between).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags, Resampling

#: Where a raster's validity comes from (see the module docstring's order).
ValiditySource = Literal["mask", "alpha", "nodata", "none"]


def alpha_band(src: Any) -> int | None:
    """The 1-based index of the band GDAL labels alpha, or None."""
    try:
        interps = src.colorinterp
    except Exception:  # noqa: BLE001 - GDAL's error of an earlier failed read, still pending
        # rasterio checks GDAL's last error after reading the colour interpretation, so a
        # damaged block read before (a preview falling back to its block-by-block read)
        # fails this header call once; the second call reads it.
        interps = src.colorinterp
    for i, interp in enumerate(interps):
        if interp == ColorInterp.alpha:
            return i + 1
    return None


def validity_source(src: Any) -> ValiditySource:
    """Which of a mask band, an alpha band or nodata values says where ``src`` holds data."""
    first = src.mask_flag_enums[0]
    if MaskFlags.per_dataset in first and MaskFlags.alpha not in first:
        return "mask"
    if alpha_band(src) is not None:
        return "alpha"
    if any(MaskFlags.nodata in flags for flags in src.mask_flag_enums):
        return "nodata"
    return "none"


def read_validity(
    src: Any,
    window: Any = None,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.nearest,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The validity of ``window`` of ``src``: ``(rows, cols)`` uint8, 0 invalid, > 0 valid.

    Args:
        src: an open rasterio dataset.
        window: the pixel window (None: the whole raster).
        out_shape: ``(rows, cols)`` to read the window at (decimated or resampled); None: its own.
        resampling: GDAL resampling of a read at ``out_shape`` (average: a pixel is valid where
            any pixel under it is).
        out: optional C-contiguous uint8 array of the result's shape to fill; returned.
    """
    shape = out_shape
    if shape is None:
        if window is None:
            shape = (src.height, src.width)
        else:
            shape = (int(window.height), int(window.width))
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    source = validity_source(src)
    kwargs: dict[str, Any] = {"window": window, "resampling": resampling}
    if source == "mask":
        got = src.read_masks(1, out=out, **kwargs)  # decoded into ``out``, at its shape
        if got is not out:
            out[...] = got
    elif source == "alpha":
        alpha = src.read(alpha_band(src), out_shape=shape, **kwargs)
        np.not_equal(alpha, 0, out=out.view(np.bool_))
        out *= np.uint8(255)
    elif source == "nodata":
        masks = src.read_masks(out_shape=(src.count, *shape), **kwargs)
        np.maximum.reduce(masks, axis=0, out=out)
    else:
        out[...] = 255
    return out
