"""Segmentation: a class per pixel -> one Cloud-Optimized GeoTIFF per input raster.

Per rank (``seam=crop``): each published chunk carries, per raster and per run of horizontally
adjacent done tiles of one tile row (:func:`~mgpr.geo.seams.core_runs`), ONE part GeoTIFF of the
tiles' owned cores (:func:`~mgpr.geo.tiling.owner_region`: every raster pixel is owned by exactly
one tile, so no pixel is written twice and nothing is blended). The part is published before the
chunk's manifest, so a tile is done iff a published manifest lists it, and its pixels are then on
disk. Part file names say what they hold: ``<part>.seg.<raster hash>.r<row>c<c0>-<c1>.tif``
(class ids) and ``<part>.prob.<...>.tif`` (``probabilities=true``: K uint8 bands, p x 255). Memory
per rank: one run's rectangle (tile_size x run width) at a time, never the raster.

``seam=blend``: the chunk carries each raster's done tiles whole (probabilities + validity) in
one stack file instead, blended at assembly (:mod:`mgpr.tasks.segmentation_blend`).

Assembly, per raster on the rank that finalises it (:meth:`SegmentationTask.finalise`, into the
merge folder; rank 0's :meth:`~SegmentationTask.merge` renames the files into ``segmentation/``
and assembles any raster left over): the ledger picks one part per done tile; the picked tiles
of each part are regrouped into runs and each becomes one VRT source (a sub-rectangle of that
part's file), so a tile copied into two parts (a requeue) is read from the picked one only. The
VRT is streamed into the COG (:func:`~mgpr.outputs.cog.assemble_cog`); pixels of failed, empty
(all nodata) or missing tiles are in no source and read as nodata (255, or 65535 above 255 classes).

With ``aoi=`` the pixels of a tile whose centre lies outside the area are nodata like those of
the tile's nodata mask (:func:`in_aoi`, before either seam path).

A resumed run predicts only tiles in no manifest, so it writes only the missing tiles' cores.

Per-class totals (``summary.json`` ``classes``: pixels and ground area) are counted per core
as the parts are written (crop) or blended (blend) and summed over the picked tiles at assembly
(:mod:`mgpr.tasks.segmentation_classes`); a finalising rank hands them to rank 0 beside its
COGs (:func:`totals_path`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgpr.geo.aoi import tile_aoi_mask
from mgpr.geo.raster import RasterInfo
from mgpr.geo.seams import CoreRun, core_runs
from mgpr.geo.tiling import Tile, TileGrid, TileId, owner_region, tile_grid
from mgpr.models.base import ClassMap
from mgpr.outputs.cog import (
    Grid,
    PartRaster,
    assemble_cog,
    class_colours,
    class_id_dtype,
    class_map_tags,
    write_part,
)
from mgpr.outputs.features import features_dir
from mgpr.outputs.ledger import Ledger
from mgpr.outputs.parts import PartSink, fsync_dir, parts_dir
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import STATUS_DONE, MergeResult, Task, TaskContext, TileOutcome
from mgpr.tasks.segmentation_blend import publish_stack, write_blended
from mgpr.tasks.segmentation_classes import (
    TilePixels,
    add_totals,
    class_totals,
    publish_tile_pixels,
    read_tile_pixels,
    read_totals,
    write_totals,
)
from mgpr.tasks.segmentation_polygons import publish_polygons, write_polygons

#: Folder of the class maps inside the run directory.
SEGMENTATION_DIR = "segmentation"
#: Part file kinds: class ids, probabilities.
KIND_IDS = "seg"
KIND_PROB = "prob"
#: ``seam`` value that blends overlapping tiles (:mod:`mgpr.tasks.segmentation_blend`).
SEAM_BLEND = "blend"
_PART_FILE = re.compile(r"\.(seg|prob)\.([0-9a-f]{12})\.r(\d+)c(\d+)-(\d+)\.tif$")


def raster_hash(path: str) -> str:
    """12 hex digits naming a raster in part file names (paths may hold any character)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]


def part_suffix(kind: str, path: str, run: CoreRun) -> str:
    """``.<kind>.<raster hash>.r<tile row>c<first col>-<last col>.tif`` of one core run."""
    row = run.tiles[0].id.row
    return f".{kind}.{raster_hash(path)}.r{row}c{run.tiles[0].id.col}-{run.tiles[-1].id.col}.tif"


def n_classes(ctx: TaskContext) -> int:
    """Classes of the run's model (255 when it names none: uint8 ids, 255 = nodata)."""
    return len(ctx.categories) if ctx.categories else 255


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """Input path -> its class map's file stem: the input's stem, ``_2``, ``_3`` when repeated.

    Numbered in sorted path order, so every rank and every resume picks the same names.
    """
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    for path in sorted(paths):
        stem = Path(path.rstrip("/")).stem or "raster"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out[path] = stem if n == 1 else f"{stem}_{n}"
    return out


def _grid(info: RasterInfo, ctx: TaskContext) -> TileGrid:
    return tile_grid(info.height, info.width, ctx.tile_size, ctx.overlap)


def _run_pixels(
    run: CoreRun,
    records: Mapping[Tile, ClassMap],
    grid: TileGrid,
    info: RasterInfo,
    dtype: np.dtype[np.generic],
    nodata: int,
    probabilities: bool,
    counted: TilePixels,
    n: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's rectangle of class ids (1, h, w) and, if asked, probabilities (K, h, w).

    Each tile's core is counted into ``counted`` (``n`` classes) once its nodata is set.
    """
    ids = np.full((1, run.height, run.width), nodata, dtype=dtype)
    probs: np.ndarray | None = None
    for tile in run.tiles:
        rec = records[tile]
        r0, c0, r1, c1 = owner_region(tile, grid, info.height, info.width)
        dst = (slice(r0 - run.row_min, r1 - run.row_min), slice(c0 - run.col_min, c1 - run.col_min))
        src = (
            slice(r0 - tile.row_off, r1 - tile.row_off),
            slice(c0 - tile.col_off, c1 - tile.col_off),
        )
        ids[0][dst] = rec.class_ids[src]
        invalid = None if rec.valid is None else rec.valid[src] == 0  # nonzero = valid
        if invalid is not None:
            ids[0][dst][invalid] = nodata
        counted.add(tile.id.key(), ids[0][dst], n)
        if probabilities and rec.probabilities is not None:
            if probs is None:
                k = rec.probabilities.shape[0]
                probs = np.zeros((k, run.height, run.width), dtype=np.uint8)
            probs[(slice(None), *dst)] = rec.probabilities[(slice(None), *src)]
            if invalid is not None:
                probs[(slice(None), *dst)][:, invalid] = 0
    return ids, probs


@dataclass(frozen=True, slots=True)
class _PartFile:
    """A published part file of one raster: its kind, tile row and column range."""

    name: str
    kind: str
    row: int
    col_first: int
    col_last: int


def _part_files(files: Sequence[str], digest: str) -> list[_PartFile]:
    out = []
    for name in files:
        m = _PART_FILE.search(name)
        if m is not None and m.group(2) == digest:
            out.append(
                _PartFile(name, m.group(1), int(m.group(3)), int(m.group(4)), int(m.group(5)))
            )
    return out


def _publish(
    sink: PartSink, path: str, run: CoreRun, ids: np.ndarray, probs: np.ndarray | None, nodata: int
) -> None:
    """Publish a run's class ids (and probabilities) as part GeoTIFFs."""
    sink.publish(
        part_suffix(KIND_IDS, path, run),
        lambda tmp: write_part(tmp, ids, run.row_min, run.col_min, nodata),
    )
    if probs is not None:
        sink.publish(
            part_suffix(KIND_PROB, path, run),
            lambda tmp: write_part(tmp, probs, run.row_min, run.col_min, None),
        )


def in_aoi(record: ClassMap, info: RasterInfo, tile: Tile) -> ClassMap:
    """``record`` with the pixels whose centre lies outside ``aoi=`` marked invalid (nodata)."""
    inside = tile_aoi_mask(info, tile)
    if inside is None:
        return record
    valid = inside if record.valid is None else (record.valid != 0) & inside
    return dataclasses.replace(record, valid=valid)


class SegmentationTask(Task):
    """Class maps per tile (``ClassMap``) -> ``segmentation/<stem>.tif`` per input raster.

    ``probabilities=true`` (:attr:`TaskContext.probabilities`) also publishes and assembles the
    per-class probabilities.
    """

    name = "segmentation"
    record_type = ClassMap
    overlap_warning = (
        "overlap=0: segmentation tiles see no context across their edges, so classes may change "
        "at tile seams; overlap=64 (or a quarter of tile_size) is a good start"
    )

    def write_payload(
        self, outcomes: Sequence[TileOutcome], ctx: TaskContext, sink: PartSink
    ) -> dict[str, int]:
        """One part GeoTIFF per run of neighbouring done tiles (see the module docstring)."""
        by_path: dict[str, dict[Tile, ClassMap]] = {}
        for outcome in outcomes:
            self.check(outcome)
            if outcome.status == STATUS_DONE:
                info = ctx.rasters[outcome.tile.id.path]
                record = in_aoi(outcome.record, info, outcome.tile)
                by_path.setdefault(outcome.tile.id.path, {})[outcome.tile] = record
        k = n_classes(ctx)
        dtype, nodata = class_id_dtype(k)
        counts: dict[str, int] = {}
        counted = TilePixels()
        for path, records in by_path.items():
            if ctx.seam == SEAM_BLEND:
                ordered = sorted(records, key=lambda t: (t.id.row, t.id.col))
                publish_stack(sink, raster_hash(path), ordered, records)
                counts.update({t.id.key(): 1 for t in ordered})
                continue
            info = ctx.rasters[path]
            grid = _grid(info, ctx)
            for run in core_runs(records, grid, info.height, info.width):
                ids, probs = _run_pixels(
                    run, records, grid, info, dtype, nodata, ctx.probabilities, counted, k
                )
                _publish(sink, path, run, ids, probs, nodata)
                for tile in run.tiles:
                    counts[tile.id.key()] = 1
        if by_path and ctx.seam != SEAM_BLEND:
            publish_tile_pixels(sink, counted)  # after the rasters, before the manifest
        return counts

    def sources(
        self,
        run_dir: Path,
        ledger: Ledger,
        info: RasterInfo,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        kind: str,
    ) -> list[PartRaster]:
        """VRT sources of one raster: the picked tiles' cores, one rectangle per run per part."""
        grid = _grid(info, ctx)
        digest = raster_hash(info.path)
        keys = [k for k, t in tiles.items() if t.id.path == info.path]
        folder = parts_dir(run_dir)
        out: list[PartRaster] = []
        for part_name, picked in sorted(ledger.picks(keys).items()):
            files = [
                f for f in _part_files(ledger.parts[part_name].files, digest) if f.kind == kind
            ]
            for run in core_runs([tiles[k] for k in picked], grid, info.height, info.width):
                first = run.tiles[0].id
                match = [
                    f
                    for f in files
                    if f.row == first.row and f.col_first <= first.col <= f.col_last
                ]
                if not match:
                    continue  # e.g. probabilities asked only on a resume: no such file
                f = match[0]
                file_tile = Tile(TileId(info.path, f.row, f.col_first), 0, 0, 0, 0, 0, 0)
                fr0, fc0, _, _ = owner_region(file_tile, grid, info.height, info.width)
                out.append(
                    PartRaster(
                        folder / f.name,
                        run.row_min,
                        run.col_min,
                        run.height,
                        run.width,
                        src_row_off=run.row_min - fr0,
                        src_col_off=run.col_min - fc0,
                    )
                )
        return out

    def finalise(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        paths: Sequence[str],
    ) -> Mapping[str, FeatureBatch]:
        """This rank's share: assemble the COGs of the rasters ``paths`` into the merge folder.

        Rank 0's :meth:`merge` renames them into ``segmentation/`` (same file system: no copy)
        and assembles itself any raster whose files are not there. ``vectorize=true``: each
        class map's polygons are traced here too (:func:`publish_polygons`), so rank 0 only
        writes them. Returns no features: the previews draw the class maps.
        """
        index = {p: i for i, p in enumerate(ctx.rasters)}
        for path in paths:
            stem = finalised_stem(run_dir, index[path])
            finals, totals = self.assemble(run_dir, ledger, ctx, tiles, path, stem)
            write_totals(totals_path(stem), totals)
            if ctx.vectorize:
                nodata = class_id_dtype(n_classes(ctx))[1]
                publish_polygons(run_dir, ctx, path, index[path], finals[0], nodata)
        return {}

    def assemble(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        path: str,
        stem: Path,
    ) -> tuple[list[Path], dict[str, dict[str, float]] | None]:
        """One raster's class map ``<stem>.tif`` (and ``<stem>_prob.tif``).

        Returns the files and the map's per-class totals
        (:func:`~mgpr.tasks.segmentation_classes.class_totals`; None when parts of an older
        mgpr hold no counts).
        """
        info = ctx.rasters[path]
        k = n_classes(ctx)
        dtype, nodata = class_id_dtype(k)
        categories = list(ctx.categories) if ctx.categories else None
        # a GCP/RPC input (no transform-based CRS, native grid): its GCPs/RPCs go along
        georef = path if info.crs_wkt is None and info.model_grid is None else None
        grid = Grid(info.height, info.width, info.transform, info.crs_wkt, georef)
        scratch = stem.with_name(f".{stem.name}.blend")
        keys = [key for key, t in tiles.items() if t.id.path == path]
        try:
            if ctx.seam == SEAM_BLEND:
                counted = TilePixels()
                ids, probs = write_blended(
                    run_dir,
                    ledger,
                    info,
                    _grid(info, ctx),
                    tiles,
                    raster_hash(path),
                    scratch,
                    dtype,
                    nodata,
                    ctx.probabilities,
                    counted,
                )
                rows = counted.table()
            else:
                rows = read_tile_pixels(run_dir, ledger, keys)
                ids = self.sources(run_dir, ledger, info, ctx, tiles, KIND_IDS)
                probs = []
                if ctx.probabilities:
                    probs = self.sources(run_dir, ledger, info, ctx, tiles, KIND_PROB)
            out = [
                assemble_cog(
                    stem.with_name(f"{stem.name}.tif"),
                    ids,
                    grid,
                    bands=1,
                    dtype=dtype,
                    nodata=nodata,
                    resampling="MODE",
                    descriptions=("class",),
                    colours=class_colours(k),
                    category_names=categories,
                    tags=class_map_tags(categories or [], path),
                )
            ]
            if ctx.probabilities and categories:
                out.append(
                    assemble_cog(
                        stem.with_name(f"{stem.name}_prob.tif"),
                        probs,
                        grid,
                        bands=len(categories),
                        dtype=np.dtype(np.uint8),
                        nodata=None,
                        resampling="AVERAGE",
                        mask_from=(out[0], int(nodata)),  # invalid where the class map is
                        descriptions=categories,
                        tags={"scale": "p x 255", **class_map_tags(categories, path)},
                    )
                )
            totals = None
            if rows is not None:
                totals = class_totals(
                    rows, _picked_cores(ledger, info, ctx, tiles), info, categories
                )
            return out, totals
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def merge(
        self,
        run_dir: Path,
        ledger: Ledger,
        ctx: TaskContext,
        tiles: Mapping[str, Tile],
        output_format: str,
        output_name: str,
        use_finalised: bool = False,
    ) -> MergeResult:
        """Every raster's class map (and probabilities) COG in ``segmentation/``.

        With ``use_finalised`` a raster whose COGs a rank's :meth:`finalise` published is only
        renamed into place; any other raster is assembled here.
        """
        result = MergeResult()
        names = output_names(list(ctx.rasters))
        categories = list(ctx.categories) if ctx.categories else None
        out_dir = run_dir / SEGMENTATION_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        index = {p: i for i, p in enumerate(ctx.rasters)}
        known = True  # every raster's per-class totals are known
        for path in sorted(ctx.rasters):
            info = ctx.rasters[path]
            stem = out_dir / names[path]
            done = finalised_stem(run_dir, index[path])
            wants_prob = bool(ctx.probabilities and categories)
            files = [done.with_name(f"{done.name}.tif")]
            if wants_prob:
                files.append(done.with_name(f"{done.name}_prob.tif"))
            counts = totals_path(done)
            if use_finalised and all(f.exists() for f in [*files, counts]):
                totals = read_totals(counts)
                counts.unlink()
                finals = [stem.with_name(f"{stem.name}.tif")]
                if wants_prob:
                    finals.append(stem.with_name(f"{stem.name}_prob.tif"))
                for src, dst in zip(files, finals, strict=True):
                    os.replace(src, dst)
                fsync_dir(out_dir)
            else:
                finals, totals = self.assemble(run_dir, ledger, ctx, tiles, path, stem)
            if totals is None:
                known = False
            else:
                add_totals(result.classes, totals)
            result.output_paths.append(finals[0])
            result.records += _owned_pixels(ledger, info, ctx, tiles)
            result.output_paths.extend(finals[1:])
            result.outputs_by_input[path] = [str(f) for f in finals]
        if not known:
            result.classes.clear()  # partial totals would mislead: none rather
        if ctx.vectorize:
            cogs = {p: out_dir / f"{names[p]}.tif" for p in ctx.rasters}
            nodata = class_id_dtype(n_classes(ctx))[1]
            formats = (output_format, output_name)
            write_polygons(run_dir, ctx, cogs, nodata, *formats, result, use_finalised)
        result.output_path = result.output_paths[0] if result.output_paths else None
        return result


def finalised_stem(run_dir: Path, index: int) -> Path:
    """Where a rank's :meth:`SegmentationTask.finalise` puts the ``index``-th raster's COGs."""
    return features_dir(run_dir) / f"raster{index:06d}.segmentation"


def totals_path(stem: Path) -> Path:
    """The per-class totals a finalising rank publishes beside its COGs, for rank 0."""
    return stem.with_name(f"{stem.name}.classes.json")


def _owned_pixels(
    ledger: Ledger, info: RasterInfo, ctx: TaskContext, tiles: Mapping[str, Tile]
) -> int:
    """Class-map pixels written from predicted tiles: the owned cores of the raster's done tiles.

    Nodata pixels of those tiles count too (the input's nodata, and with ``aoi=`` the part
    outside the area): ``classes`` counts the classified ones exactly. Counting the area's
    part instead was an estimate (its area, which the pixel-centre rule matches only to within
    the outline) that could fall below the classified pixels.
    """
    cores = _picked_cores(ledger, info, ctx, tiles).values()
    return sum((r1 - r0) * (c1 - c0) for r0, c0, r1, c1 in cores)


def _picked_cores(
    ledger: Ledger, info: RasterInfo, ctx: TaskContext, tiles: Mapping[str, Tile]
) -> dict[str, tuple[int, int, int, int]]:
    """Tile key -> owned core ``(r0, c0, r1, c1)`` of the raster's done tiles (each once)."""
    grid = _grid(info, ctx)
    keys = [k for k, t in tiles.items() if t.id.path == info.path]
    return {
        key: owner_region(tiles[key], grid, info.height, info.width)
        for picked in ledger.picks(keys).values()
        for key in picked
    }
