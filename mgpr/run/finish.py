"""The end of a run on rank 0: merge the parts, save ``summary.json`` and print the summary.

``summary.json`` (in the run directory) holds: ``mgpr_version``, ``finished_at``, ``run_dir``,
``output`` (the first output file or null), ``outputs`` (every output file: ``predictions.gpkg``
and/or ``<layer>.parquet``, as ``output_format`` chose), ``outputs_by_input`` (segmentation:
input path -> its class map files; null otherwise), ``layers`` (layer -> features),
``records``, ``task``, ``model``, ``weights`` (what was loaded), ``random_weights``, ``precision``,
``compile`` (rank 0's ``{requested, used: compiled|eager, mode, reason}``), ``tta``
(``{mode, views}`` or null), ``world_size``,
``num_nodes``, ``strategy``, ``tiles_total`` (planned), ``tiles_predicted`` (model run),
``tiles_skipped_nodata``, ``tiles_failed``, ``failed_tiles`` (first 100 ``{tile, reason}``; all of
them are in ``failed_tiles.csv``), ``tiles_missing`` (planned tiles in no published part; listed in
``missing_tiles.txt``, the run exits 4), ``duplicate_tiles`` (tile copies found in more than one
part, each kept once), ``duplicates_removed`` (seam de-duplication), ``duplicates_across_inputs``
(boxes found again where two inputs overlap on the ground, removed), ``classes`` (label ->
``count`` of features written, a classifier's tiles by top-1 label, and ``area_m2`` for segments),
``max_detections`` / ``tiles_at_box_cap`` (detection: the per-tile box cap and the predicted tiles
holding that many boxes), ``wall_s`` (whole command on rank 0, seconds: from the process start,
before the imports, to just before ``summary.json`` is written, report.json/report.png included),
``command_start_unix_s`` (that start, s since the epoch), ``phases`` (``startup_s``,
``predict_s``, ``merge_outputs_s``: :func:`command_phases`, summing to ``wall_s``),
``predict_call_s`` (``Trainer.predict`` incl. rank and worker start-up), ``predict_loop_s``
(DataLoader iterator created to last batch, slowest rank), ``tiles_this_run`` (tiles this command's
ranks predicted, skipped or failed), ``tiles_earlier_runs`` (those of the plan an earlier run of
the same job finished, so a resume's counts above are the whole job's), ``tiles_per_s`` (tiles
predicted or skipped in this run / ``predict_loop_s``), ``model_tiles_per_s`` (of those, the tiles
the model ran on: not nodata, not unreadable), ``tiles_per_s_per_rank`` (by global rank),
``stale_outputs`` (only when files an
earlier run of the job wrote are not this run's outputs:
:func:`~mgpr.outputs.rundir.stale_outputs`), ``hint`` (the report's bottleneck hint),
``output_crs`` (only with the key: the vector layers' CRS, ``EPSG:4326``), ``aoi`` (only with
``aoi=``: ``path``, ``crs``, ``polygons``, ``sha256``, ``inputs_outside`` (inputs left out),
``tiles_outside`` (tiles of the kept inputs not planned)), ``pixel_coordinates`` (inputs without
CRS or transform: results in pixel coordinates), ``no_crs`` (inputs with a geotransform but no
CRS: results in the transform's coordinates), ``resolution`` (``gsd``: each input's factor,
see :func:`describe_resolution`),
``provenance`` (mgpr/torch/lightning/rasterio/GDAL versions, host, inputs with size and mtime,
tiling) and, in the quick start, ``demo_check`` (planted objects found against the ground truth).
"""

from __future__ import annotations

import csv
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mgpr.conf.schema import PredictConfig
from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile
from mgpr.models.registry import max_detections_for
from mgpr.outputs.rundir import stale_outputs, write_json_atomic
from mgpr.outputs.vector import FeatureBatch
from mgpr.run.summary_text import print_summary
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext
from mgpr.tasks.merge import merge_run

log = logging.getLogger(__name__)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def demo_check(output: Path, truth_path: Path, layer: str = "detections") -> dict[str, Any]:
    """Compare detections with the planted objects: each found exactly once, footprint error.

    A truth object is *found* by a detection whose pixel box has IoU >= 0.5 with it; more than
    one such detection is a duplicate. ``max_footprint_error_px`` is the largest difference of
    any box edge, in raster pixels, between a matched detection and its object.
    """
    import pyogrio

    from mgpr.testimage import read_truth

    truth = read_truth(truth_path)
    columns = ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    if output.suffix == ".parquet":  # GeoParquet: one file per layer, read with pyarrow
        import pyarrow.parquet as pq

        data = [c.to_numpy() for c in pq.read_table(output, columns=columns).columns]
    else:
        _meta, _fids, _geom, data = pyogrio.raw.read(
            output, layer=layer, columns=columns, read_geometry=False
        )
    det = np.stack([np.asarray(c, dtype=np.float64) for c in data], axis=1).reshape(-1, 4)
    found = missed = duplicates = 0
    max_err = 0.0
    used = np.zeros(len(det), dtype=bool)
    for obj in truth:
        gt = np.array([obj.col_min, obj.row_min, obj.col_max, obj.row_max], dtype=np.float64)
        if len(det):
            ix = np.clip(np.minimum(det[:, 2], gt[2]) - np.maximum(det[:, 0], gt[0]), 0, None)
            iy = np.clip(np.minimum(det[:, 3], gt[3]) - np.maximum(det[:, 1], gt[1]), 0, None)
            inter = ix * iy
            union = (
                (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
                + (gt[2] - gt[0]) * (gt[3] - gt[1])
                - inter
            )
            match = np.flatnonzero(inter / np.maximum(union, 1e-9) >= 0.5)
        else:
            match = np.empty(0, dtype=np.int64)
        if len(match) == 0:
            missed += 1
            continue
        found += 1
        duplicates += len(match) - 1
        used[match] = True
        max_err = max(max_err, float(np.abs(det[match[0]] - gt).max()))
    return {
        "planted": len(truth),
        "found": found,
        "missed": missed,
        "duplicates": duplicates,
        "unmatched_detections": int((~used).sum()),
        "on_seam": sum(1 for o in truth if o.on_seam),
        "max_footprint_error_px": max_err,
        "truth": str(truth_path),
    }


def finish_run(
    cfg: PredictConfig,
    *,
    run_dir: Path,
    adapter: Any,
    model_name: str,
    rasters: Sequence[RasterInfo],
    tiles: Sequence[Tile],
    stats: dict[str, Any],
    precision: str,
    t_start: float,
    truth_path: Path | None,
    demo: bool,
    value_ranges: dict[str, Any] | None = None,
    aoi: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge, report and summarise (rank 0 only); returns the summary dict.

    ``aoi``: with ``aoi=``, the area's path, CRS, polygon count, content hash, the inputs left
    out and the tiles not planned (outside it), recorded as ``summary["aoi"]``.

    ``tiles``: the whole plan, as the run planned it (the ledger accounts each tile once).

    ``value_ranges``: each raster's :class:`~mgpr.geo.values.ValueRange` (None: raw values or
    fake data), recorded as ``summary["values"]``.
    """
    world = stats["world_size"]
    summary: dict[str, Any] = {
        "mgpr_version": _version("mgpr"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(run_dir),
        "task": adapter.task,
        "model": model_name,
        "weights": adapter.weights_id,
        "random_weights": bool(adapter.random_weights),
        "precision": precision,
        "compile": stats.get("compile"),
        "tta": _tta(cfg.tta, cfg.tta_fusion if adapter.task == "detection" else None),
        "world_size": world,
        "num_nodes": stats["num_nodes"],
        "strategy": stats["strategy"],
    }
    if cfg.use_fake_data:
        tiles_total = cfg.dummy_dataset_count
        summary.update(
            output=None,
            outputs=[],
            layers={},
            records=0,
            tiles_total=tiles_total,
            tiles_predicted=tiles_total,
            tiles_skipped_nodata=0,
            tiles_failed=0,
            failed_tiles=[],
            tiles_missing=0,
            duplicates_removed=0,
            fake_data=True,
        )
    else:
        merged = merge_run(
            run_dir,
            get_task(adapter.task),
            TaskContext.for_run(cfg, rasters, adapter.categories),
            tiles,
            output_format=cfg.output_format,
            use_finalised=bool(stats.get("merge_spread")),
            box_cap=max_detections_for(model_name, cfg.max_detections),
        )
        tiles_total = merged.tiles_planned
        summary.update(
            output=str(merged.output_path) if merged.output_path else None,
            outputs=[str(p) for p in merged.output_paths],
            outputs_by_input=merged.outputs_by_input or None,
            layers=merged.layers,
            records=merged.records,
            tiles_total=tiles_total,
            tiles_predicted=merged.tiles_done,
            tiles_skipped_nodata=merged.tiles_empty,
            tiles_failed=merged.tiles_failed,
            failed_tiles=[{"tile": k, "reason": r} for k, r in merged.failed[:100]],
            tiles_missing=merged.tiles_missing,
            missing_tiles=str(merged.missing_path) if merged.missing_path else None,
            duplicate_tiles=merged.duplicate_tiles,
            duplicates_removed=merged.duplicates_removed,
            duplicates_across_inputs=merged.duplicates_across_inputs,
            classes=dict(sorted(merged.classes.items(), key=_most_first)),
            embedding=_embedding_summary(merged.features.values())
            if adapter.task == "embedding"
            else None,
            tiles_at_box_cap=merged.tiles_at_box_cap if adapter.task == "detection" else None,
            max_detections=max_detections_for(model_name, cfg.max_detections)
            if adapter.task == "detection"
            else None,
            empty_inputs=merged.empty_rasters,
            pixel_coordinates=[
                r.path for r in rasters if r.crs_wkt is None and r.native_transform.is_identity
            ],
            no_crs=[
                r.path for r in rasters if r.crs_wkt is None and not r.native_transform.is_identity
            ],
            values=describe_value_ranges(cfg, value_ranges),
            resolution=describe_resolution(cfg, rasters),
        )
        if aoi is not None:
            summary["aoi"] = aoi
        if cfg.output_crs is not None:
            from mgpr.geo.reproject import crs_label

            summary["output_crs"] = crs_label(cfg.output_crs)
        if merged.failed:
            with open(run_dir / "failed_tiles.csv", "w", newline="") as fh:
                out = csv.writer(fh)
                out.writerow(["tile_key", "reason"])
                out.writerows(merged.failed)
        else:  # a resume that retried them all: the earlier list is no longer true
            (run_dir / "failed_tiles.csv").unlink(missing_ok=True)
        from mgpr.geo.aoi import map_areas
        from mgpr.monitor.previews import write_previews

        previews = write_previews(
            run_dir,
            adapter.task,
            [r.path for r in rasters],
            merged.features,
            use_stash=bool(stats.get("merge_spread")),
            mode=cfg.previews,
            areas=map_areas(rasters),
        )
        summary["outputs"] += [str(p) for p in previews]
        summary["previews"] = [str(p) for p in previews]
    summary.update(
        command_start_unix_s=round(t_start, 3),
        predict_call_s=round(stats["predict_wall_s"], 3),
        provenance={
            "host": socket.gethostname(),
            "versions": {
                **{
                    p: _version(p)
                    for p in ("mgpr", "torch", "torchvision", "lightning", "rasterio", "hydra-core")
                },
                "gdal": _gdal_version(),  # decodes and writes every file: part of a result
            },
            "inputs": [
                {
                    "path": r.path,
                    "bytes": r.file_bytes,
                    "mtime": r.mtime,
                    "height": r.native_height,
                    "width": r.native_width,
                    "bands": r.count,
                    "dtype": r.dtype,
                    "crs": r.crs_label,
                }
                for r in rasters
            ],
            "tiling": {"tile_size": cfg.tile_size, "overlap": cfg.overlap},
        },
    )
    if demo and aoi is not None:  # the truth lists every planted object, in the area or not
        log.info("demo check skipped: aoi= limits the run, the ground truth covers the image")
    elif demo and adapter.task not in ("detection", "segmentation"):
        # The truth is objects (boxes, pixels); a tile's class has nothing to be checked against.
        log.info(
            "demo check skipped: it compares boxes or class maps with the planted objects, and "
            "model=%s is %s %s model; use model=reference or model=reference-seg for the check",
            model_name,
            "an" if adapter.task[0] in "aeiou" else "a",
            adapter.task,
        )
    elif demo and truth_path is not None and summary.get("output"):
        if adapter.task == "segmentation":
            from mgpr.tasks.segmentation_check import class_map_check

            summary["demo_check"] = class_map_check(Path(summary["output"]), truth_path)
        else:
            summary["demo_check"] = demo_check(Path(summary["output"]), truth_path)
    report_text, report = _report(run_dir, world, cfg, precision, summary, rasters, t_start)
    totals = report.get("totals", {}) if report else {}
    summary["tiles_per_s"] = totals.get("tiles_per_s")
    summary["model_tiles_per_s"] = totals.get("model_tiles_per_s")
    _record_clipping(summary, totals.get("values_clipped"))
    summary["predict_loop_s"] = totals.get("wall_s")
    this_run = totals.get("tiles")
    handled = summary["tiles_predicted"] + summary["tiles_skipped_nodata"] + summary["tiles_failed"]
    summary["tiles_this_run"] = this_run
    summary["tiles_earlier_runs"] = None if this_run is None else max(0, handled - this_run)
    summary["tiles_per_s_per_rank"] = {
        str(r["global_rank"]): r.get("tiles_per_s") for r in (report or {}).get("ranks", [])
    }
    if cfg.profiler and str(cfg.profiler).lower() not in ("none", "null"):
        # Lightning's profilers write predict-<name>-profile[-<rank>].txt (and the pytorch
        # one its traces) into the run directory (monitor/profiler.py).
        summary["profiles"] = sorted(str(p) for p in run_dir.glob("predict-*profile*"))
    removed, kept = stale_outputs(run_dir, summary["outputs"])
    if removed:
        log.info("removed %d preview(s) of an earlier run this one does not draw", len(removed))
    if kept:
        names = ", ".join(p.name for p in kept[:3]) + (", ..." if len(kept) > 3 else "")
        formats = {"gpkg": ".gpkg", "parquet": ".parquet", "both": ".gpkg/.parquet"}
        written_now = formats.get(str(cfg.output_format), "")
        renamed = any(p.suffix and p.suffix in written_now for p in kept)
        why = (
            "their layers have other names now (output_crs= puts every input's features in one "
            "layer, its absence one layer per CRS)"
            if renamed
            else "this run writes another output_format (output_format=both keeps both formats "
            "up to date)"
        )
        log.warning(
            "%d file(s) an earlier run of this job wrote are not this run's outputs (%s): %s; "
            "they may lack tiles this run retried: remove them",
            len(kept),
            names,
            why,
        )
        summary["stale_outputs"] = [str(p) for p in kept]
    from mgpr.outputs.parts import remove_leftover_temps

    remove_leftover_temps(run_dir)  # every rank is done: no temp file is anyone's now
    wall = time.time() - t_start  # the report files are in it; writing this file is not
    summary["wall_s"] = round(wall, 3)
    summary["phases"] = command_phases((report or {}).get("phases"), wall)
    write_json_atomic(run_dir / "summary.json", summary)
    print_summary(summary, report_text)
    return summary


def _gdal_version() -> str:
    import rasterio

    return str(rasterio.__gdal_version__)


def describe_value_ranges(cfg: PredictConfig, ranges: dict[str, Any] | None) -> dict[str, Any]:
    """``summary["values"]``: the ``value_range`` key as given and each raster's resolved pairs."""
    if ranges is None:
        return {"value_range": "raw", "inputs": {}}
    return {
        "value_range": cfg.value_range,
        "inputs": {p: {"source": vr.source, "range": vr.pairs()} for p, vr in ranges.items()},
    }


def _record_clipping(summary: dict[str, Any], counts: dict[str, Any] | None) -> None:
    """``values.clipped`` (whole run) and ``values.inputs[path].clipped`` from the ranks' counts.

    This run's valid values only (a resume's earlier tiles are not counted again); absent where
    nothing could clip (uint8 by [0, 255], raw values) or no tile reached the model. Rank 0
    warns once, naming the inputs over :data:`~mgpr.data.clipping.CLIPPED_WARN_SHARE` at
    either end: per input, so one raster of a folder read with a range meant for the others
    shows even where the run as a whole looks fine.
    """
    from mgpr.data.clipping import (
        CLIPPED_WARN_SHARE,
        PEAK_WARN_SHARE,
        SPAN_WARN_SHARE,
        clipped_shares,
    )

    values = summary.get("values")
    if not counts or not counts.get("values") or not isinstance(values, dict):
        return
    values["clipped"] = clipped_shares(counts)
    flagged: list[str] = []
    for path, row in (counts.get("inputs") or {}).items():
        below, above, n = row[:3]
        peak = row[3] if len(row) > 3 else None
        floor = row[4] if len(row) > 4 else None
        shares = clipped_shares(
            {"below": below, "above": above, "values": n, "peak": peak, "floor": floor}
        )
        entry = values.get("inputs", {}).get(path)
        if isinstance(entry, dict):
            entry["clipped"] = shares
        worst = max(("below", "lo"), ("above", "hi"), key=lambda end: float(shares[end[0]]))
        if float(shares[worst[0]]) > CLIPPED_WARN_SHARE:
            flagged.append(f"{path!r} {float(shares[worst[0]]):.0%} {worst[0]} {worst[1]}")
        elif peak is not None and float(peak) < PEAK_WARN_SHARE:
            top = max(0.0, float(peak))
            shown = f"{top:.1%}" if top >= 0.001 else f"{top * 100:.1g}%"  # 0.01%, not 0.0%
            flagged.append(f"{path!r} at most {shown} of the way to hi")
        elif (
            peak is not None
            and floor is not None
            and min(1.0, float(peak)) - max(0.0, float(floor)) < SPAN_WARN_SHARE
        ):
            low, high = max(0.0, float(floor)), min(1.0, float(peak))
            flagged.append(f"{path!r} only from {low:.1%} to {high:.1%} of the way to hi")
    if flagged:
        more = f" (+{len(flagged) - 3} more in summary.json)" if len(flagged) > 3 else ""
        log.warning(
            "value_range does not fit the valid values of %d input(s), which the model saw "
            "flattened to 0 (below lo) or 1 (above hi), or crushed into a narrow band (a range "
            "far wider than the data): %s%s; the range is probably meant for other data: check it "
            "against them (value_range=auto stretches each raster's 2nd-98th percentiles; "
            "per dtype: 'value_range={uint16:[lo,hi]}')",
            len(flagged),
            ", ".join(flagged[:3]),
            more,
        )


def describe_resolution(cfg: PredictConfig, rasters: Sequence[RasterInfo]) -> dict[str, Any]:
    """``summary["resolution"]``: ``gsd`` and ``resampling`` as given, and per input.

    Per input with ``gsd``: its native pixel size (metres), factor (native px per model px,
    columns and rows), the resampling used and the model grid's size.
    """
    if cfg.gsd is None:
        return {"gsd": None, "resampling": None, "inputs": {}}
    return {
        "gsd": cfg.gsd,
        "resampling": cfg.resampling,
        "inputs": {
            r.path: {
                "native_pixel_size": [abs(r.native_transform.a), abs(r.native_transform.e)],
                "crs_scale": r.crs_scale,
                "factor": [r.factor_x, r.factor_y],
                "resampling": r.resampling or "none (native pixels)",
                "model_width": r.width,
                "model_height": r.height,
            }
            for r in rasters
        },
    }


def command_phases(report_phases: dict[str, Any] | None, wall_s: float) -> dict[str, float] | None:
    """``summary.json`` ``phases``: the report's, with merge and outputs run on to ``wall_s``.

    Start-up and predict end before the report is built, so they are the report's; the
    summary's merge-and-outputs phase also holds the report's own build (and report.png), so
    the three sum to ``wall_s``. None where the report has none.
    """
    if not report_phases:
        return None
    startup, predict = float(report_phases["startup_s"]), float(report_phases["predict_s"])
    return {
        "startup_s": round(startup, 3),
        "predict_s": round(predict, 3),
        "merge_outputs_s": round(max(0.0, wall_s - startup - predict), 3),
    }


def _report(
    run_dir: Path,
    world: int,
    cfg: PredictConfig,
    precision: str,
    summary: dict[str, Any],
    rasters: Sequence[RasterInfo],
    t_start: float,
) -> tuple[str, dict[str, Any] | None]:
    """Build report.json/report.png from every rank's part; returns the text block.

    ``t_start``: the command's start (unix s), for the report's ``phases``.
    """
    from mgpr.monitor.report import build_report, format_report

    total, empty = summary.get("tiles_total") or 0, summary.get("tiles_skipped_nodata") or 0
    context = {
        "nothing_predicted": (
            f"all {total} planned tiles are nodata (skipped before the model); check the "
            "inputs' nodata value and mask (gdalinfo)"
            if total and empty == total
            else None
        ),
        "nodata_tiles": [empty, total] if total else None,
        **report_context(cfg, precision, rasters),
        "compile": (summary.get("compile") or {}).get("used"),
        "command_start_unix_s": t_start,
    }
    try:
        report = build_report(run_dir, world, context)
    except Exception as exc:  # the report must never cost the results
        log.warning("could not build the run report: %s", exc)
        return "", None
    summary["hint"] = report.get("hint")
    return format_report(report), report


def report_context(
    cfg: PredictConfig, precision: str, rasters: Sequence[RasterInfo] = ()
) -> dict[str, Any]:
    """What every report records and its hint reads, finished run or not.

    The settings (workers, batch size, precision, CPUs per task), the inputs stored in strips
    (an input counts as untiled when its block is as wide as the raster: the data-bound hint
    then names tiling them; None without rasters) and fake data's delay per tile (the hint
    names it as the wait, not the inputs).
    """
    import os

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    untiled = [r for r in rasters if r.block_shape[1] >= r.native_width and r.native_width > 512]
    return {
        "workers": cfg.workers,
        "batch_size": cfg.batch_size,
        "precision": precision,
        "cpus_per_task": int(cpus) if cpus else os.cpu_count(),
        "untiled_inputs": len(untiled) if rasters else None,
        "fake_delay_s": cfg.dummy_dataset_delay if cfg.use_fake_data else None,
    }


def _embedding_summary(batches: Iterable[FeatureBatch]) -> dict[str, Any] | None:
    """``summary.json`` ``embedding``: the vectors' length and type, from the merged features.

    None when no tile was predicted (nothing says the length).
    """
    dims = sorted({int(b.fields["embedding"].shape[1]) for b in batches if len(b)})
    if not dims:
        return None
    return {"dim": dims[0], "dtype": "float32", "column": "embedding"}


def _most_first(item: tuple[str, dict[str, float]]) -> tuple[float, str]:
    """Sort key of a ``classes`` entry: largest ground area, else most pixels or features first."""
    label, entry = item
    size = entry.get("area_m2", entry.get("pixels", entry.get("count", 0)))
    return (-float(size), label)


def _tta(mode: str, fusion: str | None) -> dict[str, Any] | None:
    """``summary["tta"]``: the views each tile ran in, or None without test-time augmentation.

    ``fusion``: a detector's ``tta_fusion`` (how its views' boxes became one set), else None.
    """
    from mgpr.models.tta import VIEWS

    if mode == "none":
        return None
    out: dict[str, Any] = {"mode": mode, "views": len(VIEWS[mode])}
    if fusion is not None:
        out["fusion"] = fusion
    return out
