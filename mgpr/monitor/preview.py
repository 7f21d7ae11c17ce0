"""``preview.png``: a quicklook of one input raster with the run's results drawn on it.

The raster is read decimated (:mod:`mgpr.monitor.decimated_read`: GDAL's overviews when it has
some, else every block decoded once on the rank's idle CPUs; memory bounded either way), at
most :data:`MAX_PREVIEW_PX` pixels on the longer side, bands 1-3 (or band 1 as grey; values other
than uint8 are stretched between their 2nd and 98th percentile). On it:

* detections: each box outlined, coloured by its label;
* classification: each tile footprint filled (translucent) with the colour of its top-1 class;
* segmentation: the class map (its own colour table), translucent, nodata left clear;
* embedding: each tile footprint filled with the colour of its vector's first 3 principal
  components (:mod:`mgpr.monitor.embedding_colours`);

plus a legend (the most frequent classes, at most :data:`MAX_LEGEND`) and a scale bar in the
CRS's linear unit (pixels for rasters without CRS). Features arrive in map coordinates (WKB, the
merge's output) and are drawn in raster pixel coordinates through the inverse transform.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import shapely
from rasterio.enums import Resampling

from mgpr.monitor.decimated_read import read_decimated, read_preview_image
from mgpr.outputs.cog import class_colours

#: Longer side of the preview image, pixels (the PNG is this size, give or take the margins).
MAX_PREVIEW_PX = 1600
#: Classes shown in the legend (the most frequent ones).
MAX_LEGEND = 12


def preview_name(stem: str | None) -> str:
    """``preview.png`` for a run with one input, ``preview_<stem>.png`` for each of several."""
    return "preview.png" if stem is None else f"preview_{stem}.png"


def _decimated_shape(height: int, width: int, max_px: int) -> tuple[int, int, float]:
    scale = min(1.0, max_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale)), scale


def preview_bands(src: Any) -> list[int]:
    """The bands shown as the preview's colours (1-based): true colour where the file says so.

    The bands tagged red, green and blue (a blue-green-red-NIR file is shown as red-green-blue,
    not blue-green-red), else the first three that are not alpha, else the first band as grey.
    """
    interp = [c.name for c in src.colorinterp]
    if all(c in interp for c in ("red", "green", "blue")):
        return [interp.index(c) + 1 for c in ("red", "green", "blue")]
    colour = [i + 1 for i, c in enumerate(interp) if c != "alpha"]
    return colour[:3] if len(colour) >= 3 else colour[:1] or [1]


def _read_rgb(src: Any, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    bands = preview_bands(src)
    data, valid = read_preview_image(src, bands, shape)
    if data.dtype != np.uint8:
        # NaN and +-inf (float nodata, declared or not) are no colour: shown as nodata, left
        # out of the stretch, and never cast to uint8 (inf overflowed the multiply: a warning).
        from mgpr.geo.values import real_values

        valid &= real_values(data, axis=0)  # NaN, +-inf, +-3.4028235e38
        vals = data[:, valid].astype(np.float64)
        lo, hi = np.percentile(vals, (2, 98)) if vals.size else (0.0, 1.0)
        unit = np.nan_to_num(
            (data.astype(np.float64) - lo) / max(hi - lo, 1e-12), nan=0.0, posinf=1.0, neginf=0.0
        )
        data = np.clip(unit * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(data, 3, axis=0) if len(bands) == 1 else data
    rgba = np.concatenate([rgb, (valid * 255).astype(np.uint8)[None]], axis=0)
    return np.moveaxis(rgba, 0, -1)


def _outlines(geoms: Any, inverse: Any, scale: float) -> tuple[Any, npt.NDArray[np.intp]]:
    """Each polygon part's exterior ring in preview pixels, and the feature it belongs to.

    Vectorised (shapely's array functions, one affine over every coordinate): a loop over the
    features took 2.8 s per 100,000 boxes, more than the rest of the preview, and a 10 Gpx
    mosaic of tree crowns has millions. Rings of one vertex count (boxes, tile footprints) are
    one ``(n, k, 2)`` array, which matplotlib takes without a Python object per polygon.
    """
    parts, owner = shapely.get_parts(geoms, return_index=True)
    coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    cols, rows = inverse * (coords[:, 0], coords[:, 1])
    xy = np.column_stack([np.asarray(cols), np.asarray(rows)]) * scale
    sizes = np.bincount(ring, minlength=len(parts))
    if len(parts) and (sizes == sizes[0]).all():
        return xy.reshape(len(parts), int(sizes[0]), 2), owner
    return np.split(xy, np.cumsum(sizes)[:-1]), owner


def _nice_length(extent: float) -> float:
    """A 1/2/5 x 10^k length close to a fifth of ``extent``."""
    target = extent / 5
    power = 10 ** math.floor(math.log10(target))
    return min((m * power for m in (1, 2, 5, 10)), key=lambda v: abs(v - target))


def write_preview(
    out: Path,
    raster_path: str,
    *,
    kind: str,
    features: Any = None,
    label_column: str = "label",
    class_map: Path | None = None,
    title: str = "",
    max_px: int = MAX_PREVIEW_PX,
    area: Any = None,
) -> Path:
    """Draw one raster and its results into ``out`` (PNG, at most ``max_px`` on its longer side).

    Args:
        out: the PNG to write (written to a temp name, then renamed).
        raster_path: the input raster.
        kind: ``detection`` (outlined boxes), ``classification`` (filled footprints) or
            ``segmentation`` (the class map).
        features: a pyarrow table with ``geometry`` (WKB, map coordinates) and
            ``label_column`` (detection/classification), or an ``rgb`` column (3 floats in
            [0, 1] per feature: embeddings, filled with it), or None.
        label_column: the column that colours the features (the top-1 label).
        class_map: the segmentation COG (its colour table and ``class_names`` tag are used).
        title: text above the image.
        max_px: longer side of the image, pixels.
        area: the run's area of interest (``aoi=``) over this raster, a shapely geometry in
            map coordinates: outlined (every ring, holes too), or None.

    Returns:
        ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    with rasterio.open(raster_path) as src:
        h, w, scale = _decimated_shape(src.height, src.width, max_px)
        image = _read_rgb(src, (h, w))
        inverse = ~src.transform
        unit = (src.crs.linear_units if src.crs is not None else "pixel") or "unit"
        t = src.transform
        # the length of a column step on the map (rotated transforms too), CRS units
        pixel_size = math.hypot(t.a, t.d) if src.crs is not None else 1.0
        full_width = src.width
        # drawn in raster pixels; a south-up (e > 0) or east-left (a < 0) north-aligned
        # raster is shown turned back, north up and east right, as it lies on the map
        flip_rows = src.crs is not None and t.b == 0 and t.d == 0 and t.e > 0
        flip_cols = src.crs is not None and t.b == 0 and t.d == 0 and t.a < 0
    dpi = 100
    fig = plt.figure(figsize=(w / dpi, h / dpi + 0.6), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, h / (h + 60)))
    ax.imshow(image, interpolation="nearest")
    if flip_rows:
        ax.set_ylim(-0.5, h - 0.5)
    if flip_cols:
        ax.set_xlim(w - 0.5, -0.5)
    ax.set_axis_off()
    handles: list[Any] = []
    cmap = plt.get_cmap("tab20")
    if kind == "segmentation" and class_map is not None:
        handles = _draw_class_map(ax, class_map, (h, w))
    elif features is not None and "rgb" in features.column_names and features.num_rows:
        # embeddings: each footprint filled with its vector's principal components as RGB
        geoms = shapely.from_wkb(features.column("geometry").to_numpy(zero_copy_only=False))
        polys, owner = _outlines(geoms, inverse, scale)
        rgb = features.column("rgb").combine_chunks().flatten().to_numpy().reshape(-1, 3)
        coll = PolyCollection(polys, facecolors=rgb[owner], edgecolors="none", alpha=0.6)
        ax.add_collection(coll, autolim=False)
        label = f"{features.num_rows} tiles: embedding PCA 1-3 as RGB"
        handles = [Patch(facecolor=(0.5, 0.5, 0.5), label=label)]
    elif features is not None and features.num_rows:
        geoms = shapely.from_wkb(features.column("geometry").to_numpy(zero_copy_only=False))
        labels = (
            [str(v) for v in features.column(label_column).to_pylist()]
            if label_column in features.column_names
            else ["result"] * features.num_rows
        )
        counts = Counter(labels)
        colour_of = {name: cmap(i % 20) for i, (name, _) in enumerate(counts.most_common())}
        polys, owner = _outlines(geoms, inverse, scale)
        of_feature = np.asarray([colour_of[n] for n in labels], dtype=np.float64).reshape(-1, 4)
        colours = of_feature[owner]
        if kind == "classification":
            coll = PolyCollection(polys, facecolors=colours, edgecolors="none", alpha=0.45)
        else:
            coll = PolyCollection(polys, facecolors="none", edgecolors=colours, linewidths=1.2)
        ax.add_collection(coll, autolim=False)  # the image sets the view; no extents pass
        handles = [
            Patch(color=colour_of[n], label=f"{n} ({c})") for n, c in counts.most_common(MAX_LEGEND)
        ]
    if area is not None and not area.is_empty:
        handles.append(_draw_area(ax, area, inverse, scale))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    _scale_bar(ax, full_width * pixel_size, unit)
    fig.text(
        0.01, 1 - 0.25 / (h / dpi + 0.6), title or Path(raster_path).name, fontsize=9, va="center"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _draw_area(ax: Any, area: Any, inverse: Any, scale: float) -> Any:
    """Outline the area of interest (dashed white on black, visible on any image); its legend."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    coords, ring = shapely.get_coordinates(
        shapely.get_rings(shapely.get_parts(area)), return_index=True
    )
    cols, rows = inverse * (coords[:, 0], coords[:, 1])
    xy = np.column_stack([np.asarray(cols), np.asarray(rows)]) * scale
    lines = np.split(xy, np.flatnonzero(np.diff(ring)) + 1)
    ax.add_collection(LineCollection(lines, colors="black", linewidths=2.6), autolim=False)
    ax.add_collection(
        LineCollection(lines, colors="white", linewidths=1.3, linestyles="--"), autolim=False
    )
    return Line2D([], [], color="white", linestyle="--", label="aoi")


def _draw_class_map(ax: Any, class_map: Path, shape: tuple[int, int]) -> list[Any]:
    import json

    from matplotlib.patches import Patch

    with rasterio.open(class_map) as src:
        ids = read_decimated(src, [1], shape, Resampling.nearest)[0]
        nodata = src.nodata
        names: Sequence[str] = json.loads(src.tags().get("class_names", "[]"))
        try:
            table = src.colormap(1)
        except ValueError:  # no colour table: the colours mgpr's class maps use
            table = class_colours(max(len(names), int(ids.max()) + 1 if ids.size else 1))
    top = int(ids.max()) + 1 if ids.size else 1
    lut = np.zeros((max(top, 256 if ids.dtype == np.uint8 else top), 4), np.uint8)
    for i, rgba in table.items():
        if i < len(lut):
            lut[i] = rgba
    if nodata is not None and int(nodata) < len(lut):
        lut[int(nodata)] = 0
    rgba = lut[ids]
    rgba[..., 3] = np.where(rgba[..., 3] > 0, 150, 0)
    ax.imshow(rgba, interpolation="nearest")
    classified = ids[ids != nodata] if nodata is not None else ids.ravel()
    present = Counter(classified.tolist())
    handles = []
    # Shares of the classified pixels: nodata (outside the data, an aoi, failed tiles) is no
    # class, and counting it made "background 50%" of a map that is all background.
    for cid, n in present.most_common(MAX_LEGEND):
        name = names[cid] if cid < len(names) else str(cid)
        colour = tuple(v / 255 for v in table.get(cid, (0, 0, 0, 255)))
        share = 100 * n / max(classified.size, 1)
        handles.append(Patch(color=colour, label=f"{name} ({share:.1f}%)"))
    return handles


def _scale_bar(ax: Any, extent: float, unit: str) -> None:
    """A bar of a round length at the lower left, in the CRS's linear unit.

    Placed in axes fractions (0..1 from the lower left), so it stays there on a view turned
    back for a south-up raster; ``extent`` is the image's width on the map.
    """
    length = _nice_length(extent)
    frac = length / extent
    x0, y0 = 0.04, 0.05
    for colour, width in (("white", 5), ("black", 2.5)):
        ax.plot(
            [x0, x0 + frac],
            [y0, y0],
            color=colour,
            linewidth=width,
            solid_capstyle="butt",
            transform=ax.transAxes,
        )
    text = f"{length:g} {unit if unit != 'metre' else 'm'}"
    ax.text(
        x0 + frac / 2,
        y0 + 0.015,
        text,
        ha="center",
        va="bottom",
        fontsize=8,
        color="black",
        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"},
        transform=ax.transAxes,
    )
