"""The quick start's self-check of a class map: planted objects' pixels against class 1.

The demo image (:mod:`mgpr.testimage`) plants bright rectangles; ``reference-seg`` classes a
pixel 1 (``bright``) where it is bright in every band. So the class map must be 1 at exactly the
planted objects' pixels and 0 elsewhere (nodata only where the input is nodata). Read in row
bands of the COG's blocks, so the check's memory does not grow with the raster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

#: Rows read at a time, pixels (a multiple of the COG's 512 px blocks).
BAND_ROWS = 1024


def class_map_check(class_map: Path, truth_path: Path, bright_class: int = 1) -> dict[str, Any]:
    """Compare a class map with the planted objects; ``ok`` when every valid pixel agrees.

    Returns:
        ``planted`` (objects), ``object_pixels`` (pixels inside a planted object),
        ``object_pixels_found`` (of those, classed ``bright_class``), ``false_bright_pixels``
        (classed bright outside every object), ``nodata_pixels``, ``mismatched_pixels`` and
        ``ok``, plus the ``truth`` and ``class_map`` paths.
    """
    from mgpr.testimage import read_truth

    truth = read_truth(truth_path)
    object_px = found = false_bright = nodata_px = 0
    with rasterio.open(class_map) as src:
        nodata = src.nodata
        for row0 in range(0, src.height, BAND_ROWS):
            rows = min(BAND_ROWS, src.height - row0)
            ids = src.read(1, window=Window(0, row0, src.width, rows))
            expected = np.zeros(ids.shape, dtype=bool)
            for obj in truth:
                r0, r1 = max(obj.row_min - row0, 0), min(obj.row_max - row0, rows)
                if r1 > r0:
                    expected[r0:r1, max(obj.col_min, 0) : obj.col_max] = True
            valid = ids != nodata if nodata is not None else np.ones(ids.shape, dtype=bool)
            got = ids == bright_class
            object_px += int((expected & valid).sum())
            found += int((expected & got).sum())
            false_bright += int((~expected & got).sum())
            nodata_px += int((~valid).sum())
    mismatched = object_px - found + false_bright
    return {
        "planted": len(truth),
        "object_pixels": object_px,
        "object_pixels_found": found,
        "false_bright_pixels": false_bright,
        "nodata_pixels": nodata_px,
        "mismatched_pixels": mismatched,
        "ok": mismatched == 0 and object_px > 0,
        "truth": str(truth_path),
        "class_map": str(class_map),
    }
