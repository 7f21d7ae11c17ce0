"""``vectorize=true``: the class maps' regions as polygons, in the run's vector outputs.

Each class map COG is traced in blocks (:func:`~mgpr.tasks.vectorize.class_map_features`) into
a geometries :class:`~mgpr.outputs.vector.FeatureBatch`, on the rank that assembled that COG
(:func:`publish_polygons`: a feature file in ``merge/``, as the vector tasks publish theirs);
rank 0 (:func:`write_polygons`) hands every raster's batch to the writers ``output_format``
selects, one layer per CRS (:func:`~mgpr.tasks.layers.plan_layers`, base :data:`POLYGONS_LAYER`),
tracing itself any raster whose feature file is not there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mgpr.outputs.features import feature_path, read_features, write_features
from mgpr.outputs.formats import vector_writers
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.base import MergeResult, TaskContext, tally_classes
from mgpr.tasks.layers import plan_layers, to_layer_crs
from mgpr.tasks.vectorize import class_map_features

#: Layer name base of the ``vectorize=true`` polygons (:mod:`mgpr.tasks.layers` rules).
POLYGONS_LAYER = "segments"


def write_polygons(
    run_dir: Path,
    ctx: TaskContext,
    class_maps: Mapping[str, Path],
    nodata: int,
    output_format: str,
    output_name: str,
    result: MergeResult,
    use_finalised: bool = False,
) -> None:
    """``vectorize=true``: every class map's regions as polygons, through the run's writers.

    Layers as for the vector tasks (:func:`~mgpr.tasks.layers.plan_layers`, base
    :data:`POLYGONS_LAYER`: ``segments`` when every input has one CRS, else
    ``segments_epsg<code>`` ...) in ``predictions.gpkg`` / ``segments.parquet``
    (``output_format``), in each raster's own CRS (or all in ``output_crs``); columns
    ``class_id``, ``label``, ``source``,
    ``area`` (:func:`~mgpr.tasks.vectorize.class_map_features`: traced from the final COG in
    blocks, pieces cut by block edges merged). One raster's polygons in memory at a time; the
    writers publish whole files only. Adds the files to ``result.output_paths`` and the polygon
    count of each layer to ``result.layers``.

    Args:
        run_dir: the run directory.
        ctx: the run's context (rasters, categories).
        class_maps: input path -> its assembled class map COG.
        nodata: the class maps' nodata value (no polygon).
        output_format: ``gpkg``, ``parquet`` or ``both``.
        output_name: file stem of single-file formats.
        result: the merge's result, updated.
        use_finalised: take a raster's polygons from the feature file a rank published
            (:func:`publish_polygons`) where there is one, else trace them here.
    """
    index = {p: i for i, p in enumerate(ctx.rasters)}
    writers = vector_writers(output_format, run_dir, output_name)
    try:
        rasters = [ctx.rasters[p] for p in class_maps]
        for layer in plan_layers(rasters, POLYGONS_LAYER, ctx.output_crs):
            result.layers[layer.name] = 0
            for path in layer.paths:
                done = feature_path(run_dir, index[path])
                if use_finalised and done.exists():
                    batch, meta = read_features(done)
                    if meta.get("path") != path:  # never: the raster order is the run's
                        raise AssertionError(f"{done} holds {meta.get('path')}, not {path}")
                else:
                    batch = _polygons(ctx, path, class_maps[path], nodata)
                tally_classes(result.classes, batch, count_key="polygons")
                batch = to_layer_crs(batch, ctx.rasters[path], layer)
                for writer in writers:
                    writer.write(layer.name, layer.crs_wkt, batch)
                result.layers[layer.name] += len(batch)
        for writer in writers:
            result.output_paths += writer.commit()
    finally:
        for writer in writers:
            writer.abort()


def _polygons(ctx: TaskContext, path: str, class_map: Path, nodata: int) -> FeatureBatch:
    """One raster's polygons traced from its class map COG (``path``: the input raster)."""
    names = list(ctx.categories) if ctx.categories else []
    return class_map_features(
        class_map, names, nodata, path, crs_wkt=ctx.rasters[path].crs_wkt, simplify=ctx.simplify
    )


def publish_polygons(
    run_dir: Path, ctx: TaskContext, path: str, index: int, class_map: Path, nodata: int
) -> Path:
    """A rank's share of ``vectorize=true``: one raster's polygons as its feature file.

    Published like the vector tasks' feature files (:mod:`mgpr.outputs.features`, geometries
    as WKB); rank 0's :func:`write_polygons` gathers them. ``index``: the raster's position
    in ``ctx.rasters`` (the feature file's number). Returns the file.
    """
    batch = _polygons(ctx, path, class_map, nodata)
    return write_features(feature_path(run_dir, index), batch, {"path": path})
