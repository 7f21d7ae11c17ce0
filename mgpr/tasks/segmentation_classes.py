"""Per-class totals of the class maps: each class's pixels and ground area, counted tile by tile.

Why per tile: a class map COG is assembled by GDAL from a VRT of the parts
(:mod:`mgpr.tasks.segmentation`), so there is no pass of mgpr's own over the final map to count
in, and one more decode of every map would cost seconds per gigapixel on the finalising ranks.
Each tile's *owned core* (the pixels it writes, :func:`~mgpr.geo.tiling.owner_region`) is
counted instead where mgpr holds its class ids anyway, after its nodata, failed-tile and
``aoi=`` pixels are nodata:

- ``seam=crop``: the rank writing a chunk's parts also publishes ``<part>.classes.parquet``
  (:func:`publish_tile_pixels`: one row per tile and class present, ``tile_key``, ``class_id``,
  ``pixels``), named in the chunk's manifest like its rasters; one ``np.bincount`` per core;
- ``seam=blend``: the class is decided when the finalising rank blends the tiles
  (:func:`~mgpr.tasks.segmentation_blend.blend_bands`), which counts each core there.

The assembly (:func:`class_totals`) sums the cores of the ledger's picked tiles only, so a tile
re-predicted after a requeue counts once, and the totals equal a histogram of the final map
(tested). A core's ground area per pixel is its rectangle's ground area
(:func:`~mgpr.geo.ground_area.box_ground_areas_m2`, the raster's transform and CRS: UTM, Web
Mercator, EPSG:4326 alike) over its pixel count, so a Web Mercator raster spanning latitudes
gets each tile row's own pixel area; NaN without a CRS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mgpr.geo.ground_area import box_ground_areas_m2
from mgpr.geo.raster import RasterInfo
from mgpr.outputs.ledger import Ledger
from mgpr.outputs.parts import PartSink, parts_dir, publish_file
from mgpr.tasks.base import label_names

#: Payload file of a chunk's per-tile class pixel counts (``seam=crop``).
CLASSES_SUFFIX = ".classes.parquet"

_SCHEMA = pa.schema([("tile_key", pa.string()), ("class_id", pa.int32()), ("pixels", pa.int64())])


@dataclass(slots=True)
class TilePixels:
    """Pixels per (tile, class) of some tiles' cores, classes present only (sparse rows).

    Sparse because a class map may have up to 65,535 classes (uint16): a dense row per tile
    would be 512 KiB.
    """

    keys: list[str] = field(default_factory=list)
    class_ids: list[npt.NDArray[np.int64]] = field(default_factory=list)
    pixels: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def add(self, key: str, ids: np.ndarray, n_classes: int) -> None:
        """Count one core's class ids; ids >= ``n_classes`` (the map's nodata) are left out.

        ``n_classes`` is :func:`~mgpr.tasks.segmentation.n_classes`: every class id is below it
        and the nodata id (255 / 65535) is not.
        """
        hist = np.bincount(np.asarray(ids).ravel(), minlength=n_classes)[:n_classes]
        present = np.flatnonzero(hist)
        self.keys.extend([key] * len(present))
        self.class_ids.append(present.astype(np.int64))
        self.pixels.append(hist[present].astype(np.int64))

    def table(self) -> pa.Table:
        """The rows as a ``tile_key, class_id, pixels`` table."""
        return pa.Table.from_arrays(
            [
                pa.array(self.keys, pa.string()),
                pa.array(_cat(self.class_ids), pa.int32()),
                pa.array(_cat(self.pixels), pa.int64()),
            ],
            schema=_SCHEMA,
        )


def _cat(arrays: Sequence[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def publish_tile_pixels(sink: PartSink, counted: TilePixels) -> None:
    """Publish a chunk's per-tile counts as ``<part>.classes.parquet``."""
    sink.publish_table(counted.table(), CLASSES_SUFFIX)


def read_tile_pixels(run_dir: Path, ledger: Ledger, keys: Iterable[str]) -> pa.Table | None:
    """``tile_key, class_id, pixels`` of the done tiles among ``keys``, from their picked parts.

    Only each tile's rows in the part the ledger picked for it (a tile in two parts after a
    requeue counts once). None when a picked part has no counts file (written by an mgpr before
    the counts were kept): totals would be short of its tiles, so there are none.
    """
    folder = parts_dir(run_dir)
    tables = []
    for part_name, picked in sorted(ledger.picks(keys).items()):
        files = [f for f in ledger.parts[part_name].files if f.endswith(CLASSES_SUFFIX)]
        if not files:
            return None
        table = pq.read_table(folder / files[0], schema=_SCHEMA)
        tables.append(table.filter(pc.is_in(table["tile_key"], pa.array(picked, pa.string()))))
    return pa.concat_tables(tables) if tables else _SCHEMA.empty_table()


def pixel_ground_areas_m2(
    info: RasterInfo, cores: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Ground m^2 of one pixel in each core ``(r0, c0, r1, c1)`` (raster pixels); NaN no CRS.

    The core's four corners go through the raster's transform (rotated grids too) into its CRS,
    then :func:`~mgpr.geo.ground_area.box_ground_areas_m2` gives the rectangle's ground area.
    """
    cores = np.asarray(cores, dtype=np.float64).reshape(-1, 4)
    if not len(cores):
        return np.zeros(0, dtype=np.float64)
    r0, c0, r1, c1 = cores.T
    cols = np.stack([c0, c1, c1, c0, c0], axis=1)
    rows = np.stack([r0, r0, r1, r1, r0], axis=1)
    t = info.transform
    x = t.a * cols + t.b * rows + t.c
    y = t.d * cols + t.e * rows + t.f
    areas = box_ground_areas_m2(np.stack([x, y], axis=-1), info.crs_wkt)
    return areas / np.maximum((r1 - r0) * (c1 - c0), 1.0)


def class_totals(
    rows: pa.Table,
    cores: Mapping[str, tuple[int, int, int, int]],
    info: RasterInfo,
    categories: Sequence[str] | None,
) -> dict[str, dict[str, float]]:
    """Label -> ``{"pixels": n, "area_m2": m^2}`` of one raster's class map (classes present).

    ``rows``: ``tile_key, class_id, pixels`` (:meth:`TilePixels.table`, :func:`read_tile_pixels`);
    ``cores``: each tile's owned core, raster pixels. ``area_m2`` is left out without a CRS
    (pixels are all there is). Labels are the model's class names, else the class id as text.
    """
    if not rows.num_rows:
        return {}
    encoded = pc.dictionary_encode(rows["tile_key"]).combine_chunks()
    tiles = encoded.dictionary.to_pylist()
    tile_of_row = encoded.indices.to_numpy()
    class_ids = rows["class_id"].to_numpy().astype(np.int64)
    pixels = rows["pixels"].to_numpy().astype(np.float64)
    per_pixel = pixel_ground_areas_m2(info, np.array([cores[k] for k in tiles], dtype=np.float64))
    n = int(class_ids.max()) + 1
    by_class = np.bincount(class_ids, weights=pixels, minlength=n)
    has_area = bool(np.isfinite(per_pixel).all())
    areas = np.bincount(class_ids, weights=pixels * per_pixel[tile_of_row], minlength=n)
    present = np.flatnonzero(by_class)
    out: dict[str, dict[str, float]] = {}
    for class_id, label in zip(present, label_names(present, categories), strict=True):
        entry: dict[str, float] = {"pixels": int(by_class[class_id])}
        if has_area:
            entry["area_m2"] = float(areas[class_id])
        add_totals(out, {str(label): entry})
    return out


def add_totals(into: dict[str, dict[str, float]], more: Mapping[str, Mapping[str, float]]) -> None:
    """Add one raster's :func:`class_totals` to the run's (sums per label and figure)."""
    for label, entry in more.items():
        mine = into.setdefault(label, {})
        for name, value in entry.items():
            mine[name] = mine.get(name, 0) + value


def write_totals(path: Path, totals: Mapping[str, Mapping[str, float]] | None) -> Path:
    """Publish a finalising rank's totals of one raster for rank 0 (JSON; None = not known)."""
    text = json.dumps({"classes": totals})

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return publish_file(path, write)


def read_totals(path: Path) -> dict[str, dict[str, float]] | None:
    """What :func:`write_totals` published."""
    data = json.loads(path.read_text(encoding="utf-8"))
    classes: dict[str, dict[str, float]] | None = data.get("classes")
    return classes
