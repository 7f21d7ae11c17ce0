"""``seam=blend``: tiles' probabilities weighted across their overlaps, in bounded memory.

Why a second seam: with ``seam=crop`` a pixel's class comes from one tile, so a model whose
output depends on where in the tile an object lies (most do, near tile edges) can change class
exactly at the core boundary. Blending weights every tile covering a pixel by the separable
cosine ramps of :func:`mgpr.geo.seams.blend_weights` (a partition of unity: the weights of the
tiles covering a pixel sum to 1), so the result is continuous across seams.

Per rank (payload): each chunk publishes, per raster, ONE stack GeoTIFF of its done tiles,
``<part>.blend.<raster hash>.tif``: ``K + 1`` uint8 bands (the K class probabilities,
``round(p * 255)``, then the tile's validity 0/1), ``tile_size`` columns and ``n * tile_size``
rows: tile ``i`` of the tag ``MGPR_TILES`` (``row,col;row,col;...``, grid positions) at rows
``i * tile_size``. The whole tile is kept, overlap strips included: that is what blending needs.
Published before the chunk's manifest, so a tile is done iff a published manifest lists it.

Assembly (the rank finalising the raster): tile row by tile row, the band of raster rows that
the row's tiles own (:func:`~mgpr.geo.tiling.owner_region`) is blended core by core from the
ledger's picked copy of every done tile covering it (a tile in two parts, after a requeue, counts
once); class = argmax of the weighted mean of the tiles' probabilities (ties to the lower id),
normalised by the weights of the tiles present (a failed neighbour leaves its own core nodata and
only renormalises the others). Each band is written as a band part raster in a scratch folder
and the usual VRT -> COG streaming (:func:`~mgpr.outputs.cog.assemble_cog`) turns the bands into
the class map. Memory: the decoded tiles of the (at most three) tile rows touching one band and
one band of output, ``(K + 1) * tile_size^2`` bytes per cached tile: a few rows of tiles, never
the raster.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from mgpr.geo.raster import RasterInfo
from mgpr.geo.seams import blend_weights
from mgpr.geo.tiling import Tile, TileGrid, owner_region, plan_tiles
from mgpr.models.base import ClassMap
from mgpr.outputs.cog import PartRaster, write_part
from mgpr.outputs.ledger import Ledger
from mgpr.outputs.parts import PartSink, parts_dir
from mgpr.tasks.segmentation_classes import TilePixels

#: Part file kind of the blend stacks.
KIND_BLEND = "blend"
#: Tag of a stack file listing its tiles' grid positions, in slot order.
TILES_TAG = "MGPR_TILES"
_BLEND_FILE = re.compile(r"\.blend\.([0-9a-f]{12})\.tif$")
#: Open stack files kept at once while blending.
_OPEN_FILES = 16


def blend_suffix(digest: str) -> str:
    """``.blend.<raster hash>.tif``: the one stack file of a raster in a chunk."""
    return f".{KIND_BLEND}.{digest}.tif"


def tile_stack(tiles: Sequence[Tile], records: Mapping[Tile, ClassMap]) -> npt.NDArray[np.uint8]:
    """``(K + 1, n * T, T)`` uint8: each tile's probabilities and its validity, stacked."""
    first = records[tiles[0]]
    if first.probabilities is None:
        raise ValueError(
            "seam=blend needs per-class probabilities from the model, got class ids only"
        )
    k = first.probabilities.shape[0]
    size_r, size_c = first.shape
    out = np.zeros((k + 1, len(tiles) * size_r, size_c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        rec = records[tile]
        if rec.probabilities is None or rec.probabilities.shape != (k, size_r, size_c):
            raise ValueError(f"tile {tile.id.key()} has no (K, H, W) probabilities to blend")
        rows = slice(i * size_r, (i + 1) * size_r)
        out[:k, rows] = rec.probabilities
        out[k, rows] = 1 if rec.valid is None else (rec.valid != 0)
    return out


def publish_stack(
    sink: PartSink, digest: str, tiles: Sequence[Tile], records: Mapping[Tile, ClassMap]
) -> None:
    """Publish one raster's stack file of this chunk (see the module docstring)."""
    stack = tile_stack(tiles, records)
    positions = ";".join(f"{t.id.row},{t.id.col}" for t in tiles)

    def write(tmp: Path) -> None:
        write_part(tmp, stack, 0, 0, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "r+") as dst:
                dst.update_tags(**{TILES_TAG: positions})

    sink.publish(blend_suffix(digest), write)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where a tile's probabilities are: a stack file and the tile's index in it."""

    path: Path
    index: int


def _stack_tiles(path: Path) -> list[tuple[int, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            text = src.tags().get(TILES_TAG, "")
    return [(int(r), int(c)) for r, c in (p.split(",") for p in text.split(";") if p)]


def tile_slots(
    run_dir: Path, ledger: Ledger, digest: str, keys: Sequence[str], tiles: Mapping[str, Tile]
) -> dict[tuple[int, int], _Slot]:
    """(row, col) -> the stack slot of the ledger's picked copy of each done tile of a raster."""
    folder = parts_dir(run_dir)
    out: dict[tuple[int, int], _Slot] = {}
    for part_name, picked in ledger.picks(keys).items():
        wanted = {(tiles[k].id.row, tiles[k].id.col) for k in picked}
        for name in ledger.parts[part_name].files:
            m = _BLEND_FILE.search(name)
            if m is None or m.group(1) != digest:
                continue
            for i, pos in enumerate(_stack_tiles(folder / name)):
                if pos in wanted:
                    out[pos] = _Slot(folder / name, i)
    return out


class _TileCache:
    """Decoded stack tiles of the tile rows in use, and a few open stack files."""

    def __init__(self, slots: Mapping[tuple[int, int], _Slot], tile_size: int) -> None:
        self.slots = slots
        self.tile_size = tile_size
        self.tiles: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}
        self.files: OrderedDict[Path, rasterio.io.DatasetReader] = OrderedDict()

    def get(self, pos: tuple[int, int]) -> npt.NDArray[np.uint8] | None:
        """The tile's ``(K + 1, T, T)`` stack, or None when it is not done."""
        if pos in self.tiles:
            return self.tiles[pos]
        slot = self.slots.get(pos)
        if slot is None:
            return None
        t = self.tile_size
        data: npt.NDArray[np.uint8] = self._open(slot.path).read(
            window=Window(0, slot.index * t, t, t)
        )
        self.tiles[pos] = data
        return data

    def evict_rows_below(self, row: int) -> None:
        """Forget the tiles of tile rows above ``row`` (the bands below no longer need them)."""
        for pos in [p for p in self.tiles if p[0] < row]:
            del self.tiles[pos]

    def _open(self, path: Path) -> rasterio.io.DatasetReader:
        src = self.files.pop(path, None)
        if src is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(path)
        self.files[path] = src
        while len(self.files) > _OPEN_FILES:
            self.files.popitem(last=False)[1].close()
        return src

    def close(self) -> None:
        """Close the open stack files."""
        for src in self.files.values():
            src.close()
        self.files.clear()


def _covering(start: int, stop: int, n: int, grid: TileGrid) -> range:
    """Grid indices (one axis) of the tiles covering pixels ``[start, stop)``."""
    first = max(0, math.ceil((start - grid.tile_size + 1) / grid.stride))
    last = min(n - 1, (stop - 1) // grid.stride)
    return range(first, last + 1)


def _weights(tile: Tile, grid: TileGrid, memo: dict[tuple[bool, ...], np.ndarray]) -> np.ndarray:
    """The tile's blend weights; tiles of one border class share one array."""
    cls = (
        tile.id.row == 0,
        tile.id.row == grid.n_rows - 1,
        tile.id.col == 0,
        tile.id.col == grid.n_cols - 1,
    )
    if cls not in memo:
        memo[cls] = blend_weights(tile, grid)
    return memo[cls]


@dataclass(frozen=True, slots=True)
class BlendBand:
    """One blended band of raster rows: class ids and (if asked) probabilities."""

    row_off: int
    ids: np.ndarray
    probs: np.ndarray | None


def blend_bands(
    slots: Mapping[tuple[int, int], _Slot],
    tiles_at: Mapping[tuple[int, int], Tile],
    grid: TileGrid,
    info: RasterInfo,
    dtype: np.dtype[np.generic],
    nodata: int,
    probabilities: bool,
    counted: TilePixels,
) -> Iterator[BlendBand]:
    """The raster's blended bands, top to bottom (rows of tile rows with a done tile only).

    Each owner's core is counted into ``counted`` once its classes and nodata are set.
    """
    cache = _TileCache(slots, grid.tile_size)
    memo: dict[tuple[bool, ...], np.ndarray] = {}
    try:
        for r in range(grid.n_rows):
            owners = [tiles_at[(r, c)] for c in range(grid.n_cols)]
            if not any((r, c) in slots for c in range(grid.n_cols)):
                continue
            r0, _, r1, _ = owner_region(owners[0], grid, info.height, info.width)
            rows = _covering(r0, r1, grid.n_rows, grid)
            cache.evict_rows_below(rows.start)
            ids = np.full((1, r1 - r0, info.width), nodata, dtype=dtype)
            probs: np.ndarray | None = None
            for owner in owners:
                own = cache.get((owner.id.row, owner.id.col))
                if own is None:
                    continue  # failed, empty or missing: its core stays nodata
                _, c0, _, c1 = owner_region(owner, grid, info.height, info.width)
                k = own.shape[0] - 1
                acc = np.zeros((k, r1 - r0, c1 - c0), dtype=np.float32)
                wsum = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
                for i in rows:
                    for j in _covering(c0, c1, grid.n_cols, grid):
                        data = cache.get((i, j))
                        if data is None:
                            continue
                        tile = tiles_at[(i, j)]
                        ra, rb = max(r0, tile.row_off), min(r1, tile.row_off + grid.tile_size)
                        ca, cb = max(c0, tile.col_off), min(c1, tile.col_off + grid.tile_size)
                        src = (
                            slice(ra - tile.row_off, rb - tile.row_off),
                            slice(ca - tile.col_off, cb - tile.col_off),
                        )
                        dst = (slice(ra - r0, rb - r0), slice(ca - c0, cb - c0))
                        w = _weights(tile, grid, memo)[src]
                        acc[(slice(None), *dst)] += w * data[(slice(0, k), *src)]
                        wsum[dst] += w
                block = ids[0, :, c0:c1]
                block[...] = np.argmax(acc, axis=0).astype(dtype)
                core = (
                    slice(r0 - owner.row_off, r1 - owner.row_off),
                    slice(c0 - owner.col_off, c1 - owner.col_off),
                )
                invalid = own[k][core] == 0
                block[invalid] = nodata
                counted.add(owner.id.key(), block, k)
                if probabilities:
                    if probs is None:
                        probs = np.zeros((k, r1 - r0, info.width), dtype=np.uint8)
                    mean = np.rint(acc / np.maximum(wsum, 1e-12)[None])
                    pblock = probs[:, :, c0:c1]
                    pblock[...] = np.clip(mean, 0, 255).astype(np.uint8)
                    pblock[:, invalid] = 0
            yield BlendBand(r0, ids, probs)
    finally:
        cache.close()


def write_blended(
    run_dir: Path,
    ledger: Ledger,
    info: RasterInfo,
    grid: TileGrid,
    tiles: Mapping[str, Tile],
    digest: str,
    scratch: Path,
    dtype: np.dtype[np.generic],
    nodata: int,
    probabilities: bool,
    counted: TilePixels,
) -> tuple[list[PartRaster], list[PartRaster]]:
    """Blend one raster into band part rasters under ``scratch``: (id sources, prob sources).

    The caller assembles the COGs from the returned sources and removes ``scratch``; each
    core's class pixels are counted into ``counted``.
    """
    keys = [k for k, t in tiles.items() if t.id.path == info.path]
    # Every grid position, planned or not (aoi= plans only the tiles over the area): a band's
    # owner regions and blend weights are the grid's geometry.
    tiles_at = {
        (t.id.row, t.id.col): t
        for t in plan_tiles(info.path, info.height, info.width, grid.tile_size, grid.overlap)
    }
    slots = tile_slots(run_dir, ledger, digest, keys, tiles)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    id_parts: list[PartRaster] = []
    prob_parts: list[PartRaster] = []
    for band in blend_bands(slots, tiles_at, grid, info, dtype, nodata, probabilities, counted):
        h, w = band.ids.shape[1:]
        path = scratch / f"r{band.row_off:09d}.ids.tif"
        write_part(path, band.ids, band.row_off, 0, nodata)
        id_parts.append(PartRaster(path, band.row_off, 0, h, w))
        if band.probs is not None:
            path = scratch / f"r{band.row_off:09d}.prob.tif"
            write_part(path, band.probs, band.row_off, 0, None)
            prob_parts.append(PartRaster(path, band.row_off, 0, h, w))
    return id_parts, prob_parts
