"""preview.png: the raster with results drawn, capped in size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import rasterio
import shapely
from PIL import Image

from mgpr.monitor.preview import preview_name, write_preview
from mgpr.tasks.vectorize import polygons_table
from mgpr.testimage import TestImageResult


def test_preview_of_boxes_is_capped_and_sized(
    make_image: Callable[..., TestImageResult], tmp_path: Path
) -> None:
    img = make_image(width=900, height=600, objects=6, nodata="border")
    with rasterio.open(img.path) as src:
        t = src.transform
    boxes = [
        shapely.box(*(t * (o.col_min, o.row_max)), *(t * (o.col_max, o.row_min)))
        for o in img.objects
    ]
    table = polygons_table(boxes, [1] * len(boxes), ["bg", "object"])
    out = write_preview(
        tmp_path / "preview.png", str(img.path), kind="detection", features=table, max_px=450
    )
    with Image.open(out) as png:
        assert png.size == (450, 360)  # 450 x 300 image plus a 60 px title band
        assert png.format == "PNG"
    assert preview_name(None) == "preview.png" and preview_name("a") == "preview_a.png"


def test_strip_by_strip_decimated_read_equals_one_read(
    make_image: Callable[..., TestImageResult],
) -> None:
    """read_decimated with 64 KiB strips (16 strips) gives GDAL's own one-call result, for the
    bands (average) and the nodata mask (nearest), at an integer and a non-integer factor."""
    import numpy as np
    from rasterio.enums import Resampling

    from mgpr.monitor.preview import read_decimated

    img = make_image(width=1024, height=768, objects=6, nodata="border", block_size=64)
    with rasterio.open(img.path) as src:
        for shape in ((192, 256), (250, 333)):
            whole = src.read([1, 2, 3], out_shape=(3, *shape), resampling=Resampling.average)
            strips = read_decimated(src, [1, 2, 3], shape, Resampling.average, strip_bytes=2**16)
            mask = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest)
            mask_strips = read_decimated(src, None, shape, Resampling.nearest, strip_bytes=2**14)
            if shape == (192, 256):  # factor 4: the strips are whole output rows of 4 rows
                assert np.array_equal(strips, whole)
                assert np.array_equal(mask_strips, mask)
            else:  # strip edges round to source rows: a quicklook's tolerance
                assert strips.shape == whole.shape and strips.dtype == whole.dtype
                assert np.abs(strips.astype(int) - whole).mean() < 2.0
                assert (mask_strips != mask).mean() < 0.01
