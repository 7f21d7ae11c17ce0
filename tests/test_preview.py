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
