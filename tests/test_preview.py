"""preview.png: the raster with results drawn, capped in size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import rasterio
import shapely
from conftest import write_array
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

    from mgpr.monitor.decimated_read import read_decimated

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


def test_preview_shows_true_colour_by_colour_interpretation(tmp_path: Path) -> None:
    """A blue-green-red-NIR file is shown red-green-blue; untagged files by their first bands."""
    import numpy as np
    from rasterio.enums import ColorInterp as C

    from mgpr.monitor.preview import preview_bands

    data = np.stack([np.full((64, 64), v, np.uint8) for v in (10, 20, 200, 90)])  # B, G, R, NIR
    bgrn = write_array(
        tmp_path / "bgrn.tif", data, colorinterp=(C.blue, C.green, C.red, C.undefined)
    )
    plain = write_array(tmp_path / "plain.tif", data, colorinterp=[C.gray] * 4)
    grey_alpha = write_array(tmp_path / "ga.tif", data[:2], colorinterp=(C.gray, C.alpha))
    with rasterio.open(bgrn) as a, rasterio.open(plain) as b, rasterio.open(grey_alpha) as c:
        assert (preview_bands(a), preview_bands(b), preview_bands(c)) == ([3, 2, 1], [1, 2, 3], [1])
    out = write_preview(tmp_path / "p.png", str(bgrn), kind="detection", features=None, max_px=64)
    with Image.open(out) as png:
        r, g, b_, a_ = png.convert("RGBA").getpixel((32, 60 + 32))
    assert (r, g, b_) == (200, 20, 10) and a_ == 255


def test_preview_of_float_with_nan_shows_nan_as_nodata(tmp_path: Path) -> None:
    import warnings

    import numpy as np

    data = np.random.default_rng(0).random((3, 80, 80)).astype(np.float32)
    data[:, 40:, 40:] = np.nan
    data[0, 60:, 60:] = np.inf  # overflowed the stretch's multiply: a RuntimeWarning
    path = write_array(tmp_path / "nan.tif", data)  # float32; NaN not even declared as nodata
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN cast to uint8 warned before
        out = write_preview(tmp_path / "p.png", str(path), kind="detection", features=None)
    with Image.open(out) as png:
        assert png.size[0] == 80
        rgba = np.asarray(png.convert("RGBA"))[-80:]
    assert (rgba[50:, 50:] != rgba[5, 5]).any(axis=-1).all()  # nodata differs from the image
    assert len({tuple(p) for p in rgba[50:, 50:].reshape(-1, 4)}) == 1  # one nodata colour


def test_outlines_map_every_part_to_preview_pixels_and_its_feature() -> None:
    """Vectorised outlines: one (n, 5, 2) array for boxes (matplotlib's fast path), a list for
    rings of other lengths; each part keeps its feature's index (its colour)."""
    import numpy as np
    from affine import Affine

    from mgpr.monitor.preview import _outlines

    transform = Affine(0.5, 0.0, 100.0, 0.0, -0.5, 200.0)  # 0.5 m pixels, origin (100, 200)
    boxes = [shapely.box(101, 198.5, 101.5, 199), shapely.box(102, 197.5, 102.5, 198)]
    two = shapely.multipolygons([shapely.box(104, 195, 105, 196), shapely.box(106, 195, 107, 196)])
    ring, owner = _outlines(np.array([boxes[0], two, boxes[1]]), ~transform, 0.5)
    assert isinstance(ring, np.ndarray) and ring.shape == (4, 5, 2)
    assert owner.tolist() == [0, 1, 1, 2]
    # box (104..105, 195..196) m -> columns 8..10, rows 8..10 px -> x 0.5 in the preview: 4..5
    assert sorted(set(ring[1][:, 0].tolist())) == [4.0, 5.0]
    assert sorted(set(ring[1][:, 1].tolist())) == [4.0, 5.0]
    pentagon = shapely.Polygon([(101, 199), (102, 199), (102.5, 198.5), (102, 198), (101, 198)])
    mixed, owner = _outlines(np.array([pentagon, boxes[0]]), ~transform, 1.0)
    assert isinstance(mixed, list) and [len(r) for r in mixed] == [6, 5]
    assert owner.tolist() == [0, 1]


def test_preview_outlines_the_area_of_interest_with_its_holes(tmp_path: Path) -> None:
    """aoi=: every ring of the area is drawn on the image; the rest of the image is untouched."""
    import numpy as np
    import shapely

    path = write_array(tmp_path / "grey.tif", np.full((3, 200, 200), 128, np.uint8))
    with rasterio.open(path) as src:
        t = src.transform
    px = shapely.Polygon(
        [(20, 20), (180, 20), (180, 180), (20, 180)], holes=[[(80, 80), (120, 80), (120, 120)]]
    )
    area = shapely.affinity.affine_transform(px, [t.a, t.b, t.d, t.e, t.c, t.f])
    plain = write_preview(tmp_path / "a.png", str(path), kind="detection", max_px=200)
    outlined = write_preview(tmp_path / "b.png", str(path), kind="detection", max_px=200, area=area)
    with Image.open(plain) as a, Image.open(outlined) as b:
        before = np.asarray(a.convert("RGB"))[-200:].astype(int)
        after = np.asarray(b.convert("RGB"))[-200:].astype(int)
    changed = np.abs(after - before).sum(axis=-1) > 30
    assert changed[100, 19:22].any() and changed[100, 178:182].any()  # left, right edges
    assert changed[19:22, 100].any() and changed[80, 95:105].any()  # top, the hole's edge
    assert not changed[50, 50] and not changed[150, 150] and not changed[90, 110]  # in the hole


def test_class_map_legend_shares_count_classified_pixels_only(tmp_path: Path) -> None:
    """Half the map nodata (outside an aoi, a collar): the legend's shares are of the rest."""
    import json

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from mgpr.monitor.preview import _draw_class_map

    ids = np.full((1, 64, 64), 255, np.uint8)
    ids[0, :, :32] = 0  # background on half the left
    ids[0, 48:, :32] = 1  # bright on a quarter of that
    path = write_array(tmp_path / "map.tif", ids, nodata=255)
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(class_names=json.dumps(["background", "bright"]))
    fig, ax = plt.subplots()
    try:
        labels = [h.get_label() for h in _draw_class_map(ax, path, (64, 64))]
    finally:
        plt.close(fig)
    assert labels == ["background (75.0%)", "bright (25.0%)"]


def test_a_south_up_raster_is_shown_north_up_with_a_true_scale_bar(tmp_path: Path) -> None:
    """Its first row is the south edge: drawn in pixel order north was at the bottom. The view
    is turned back, so it equals the north-up file's preview; the scale bar is where it was."""
    import numpy as np
    from affine import Affine

    data = np.zeros((3, 64, 64), np.uint8)
    data[:, :16] = 250  # a bright northern strip in the north-up file
    north_up = write_array(tmp_path / "north.tif", data)
    with rasterio.open(north_up) as src:
        profile, t = src.profile, src.transform
    south = tmp_path / "south.tif"
    profile["transform"] = Affine(t.a, 0, t.c, 0, -t.e, t.f + 64 * t.e)  # row 0 = south edge
    with rasterio.open(south, "w", **profile) as dst:
        dst.write(data[:, ::-1])
    pngs = []
    for path in (north_up, south):
        out = write_preview(tmp_path / f"{path.stem}.png", str(path), kind="detection",
                            features=None, max_px=64, title="t")  # fmt: skip
        with Image.open(out) as png:
            pngs.append(np.asarray(png.convert("RGB")))
    image = pngs[1][-64:]
    assert image[4, 32].min() > 200 and image[-10, 32].max() < 100  # bright north on top
    np.testing.assert_array_equal(pngs[0], pngs[1])
