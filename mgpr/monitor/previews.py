"""The run's quicklooks: one ``preview.png`` per input, after the merge, for every task.

Detection, classification and embedding get each raster's merged features from the merge, in
memory (what the writers wrote; nothing re-opens the GeoPackage, whose SQLite would take file
locks in the run directory); segmentation draws the input's class map COG (read decimated
from its overviews). Names: ``preview.png`` for a run with one input, ``preview_<stem>.png``
(:func:`~mgpr.monitor.preview.preview_name`, the class map's unique stem) for each of several.

Who draws: with the merge spread over ranks (:mod:`mgpr.run.merge_share`), the rank that
finalises a raster draws its preview right after (:func:`write_share_previews`, from the
features or the class map it just published) into :data:`PREVIEW_STASH`, and rank 0 only renames it
into place (:func:`write_previews`), drawing itself any preview that is not there. Otherwise
rank 0 draws them all.

Which inputs (:func:`previewed`): key ``previews``; ``auto`` draws at most
:data:`AUTO_PREVIEWS` (the first inputs in the run's order), since a run over thousands of
small rasters (a tiled national orthophoto) would otherwise spend ~50 ms and one PNG on each.

A preview is a convenience: one that cannot be drawn is logged as a warning and the run goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import shapely
from rasterio.errors import NotGeoreferencedWarning

from mgpr.monitor.embedding_colours import principal_rgb
from mgpr.monitor.preview import preview_name, write_preview
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.segmentation import finalised_stem, output_names

log = logging.getLogger(__name__)

#: The column that colours each task's features (its top-1 label).
LABEL_COLUMNS: dict[str, str] = {"detection": "label", "classification": "label_1"}
#: Folder of the run directory where finalising ranks leave their previews for rank 0.
PREVIEW_STASH = ".previews"
#: With ``previews=auto``, at most this many inputs get a preview.
AUTO_PREVIEWS = 12


def previewed(raster_paths: Sequence[str], mode: str) -> list[str]:
    """The inputs that get a preview under ``previews=mode`` (auto | all | none), in run order."""
    if mode == "none":
        return []
    if mode == "all":
        return list(raster_paths)
    return list(raster_paths[:AUTO_PREVIEWS])


def stash_path(run_dir: Path, index: int) -> Path:
    """Where a finalising rank leaves the preview of the ``index``-th input raster."""
    return run_dir / PREVIEW_STASH / f"raster{index:06d}.png"


def clear_stash(run_dir: Path) -> None:
    """Remove the stashed previews (before a merge starts, and once they are in place)."""
    shutil.rmtree(run_dir / PREVIEW_STASH, ignore_errors=True)


def _table(batch: FeatureBatch, label: str) -> pa.Table:
    """A raster's features as ``write_preview`` takes them: WKB polygons and their label.

    Embeddings (an ``embedding`` vector column) get their colour instead, an ``rgb`` column
    (:func:`~mgpr.monitor.embedding_colours.principal_rgb`).
    """
    geoms = batch.shapes()
    labels = batch.fields.get(label)
    columns: dict[str, object] = {
        "geometry": pa.array(shapely.to_wkb(geoms).tolist(), pa.binary()),
        "label": [str(v) for v in labels] if labels is not None else ["result"] * len(batch),
    }
    vectors = batch.fields.get("embedding")
    if vectors is not None and np.ndim(vectors) == 2:
        rgb = principal_rgb(vectors)
        columns["rgb"] = pa.FixedSizeListArray.from_arrays(pa.array(rgb.reshape(-1)), 3)
    return pa.table(columns)


def _draw(
    out: Path,
    path: str,
    task: str,
    batch: FeatureBatch | None = None,
    class_map: Path | None = None,
    area: Any = None,
) -> bool:
    """One preview; False (and a warning) when it cannot be drawn.

    ``area``: the run's ``aoi=`` over this raster in its map coordinates (outlined), or None.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel coordinates
            if task == "segmentation":
                found = class_map if class_map is not None and class_map.exists() else None
                write_preview(out, path, kind=task, class_map=found, area=area)
            else:
                mine = _table(batch, LABEL_COLUMNS.get(task, "label")) if batch else None
                write_preview(out, path, kind=task, features=mine, area=area)
        return True
    except Exception as exc:  # noqa: BLE001 - a quicklook never fails a run
        log.warning("preview of %s not written: %s", path, exc)
        return False


def write_share_previews(
    run_dir: Path,
    task: str,
    raster_paths: Sequence[str],
    share: Sequence[str],
    mode: str = "auto",
    areas: Mapping[str, Any] | None = None,
    features: Mapping[str, FeatureBatch] | None = None,
) -> None:
    """A finalising rank: the previews of the rasters ``share`` it just finalised, stashed.

    ``raster_paths``: every input in the run's order (the index of the finalised files).
    Drawn from what the rank published: the raster's features (``features``, as
    :func:`~mgpr.tasks.merge.finalise_share` returns them), or its class map COG; only for the
    rasters :func:`previewed` picks under ``previews=mode``. ``areas``: each raster's ``aoi=``
    in map coordinates (:func:`mgpr.geo.aoi.aoi_in_map`), outlined; None without.
    """
    features = features or {}
    areas = areas or {}
    index = {p: i for i, p in enumerate(raster_paths)}
    chosen = set(previewed(raster_paths, mode))
    for path in share:
        if path not in chosen:
            continue
        i = index[path]
        out = stash_path(run_dir, i)
        out.parent.mkdir(parents=True, exist_ok=True)
        if task == "segmentation":
            stem = finalised_stem(run_dir, i)
            class_map = stem.with_name(f"{stem.name}.tif")
            _draw(out, path, task, class_map=class_map, area=areas.get(path))
        else:
            _draw(out, path, task, batch=features.get(path), area=areas.get(path))


def write_previews(
    run_dir: Path,
    task: str,
    raster_paths: Sequence[str],
    features: Mapping[str, FeatureBatch],
    use_stash: bool = False,
    mode: str = "auto",
    areas: Mapping[str, Any] | None = None,
) -> list[Path]:
    """The previews into ``run_dir`` (rank 0, after the merge); returns them.

    ``features``: each raster's merged features (vector tasks), as the merge wrote them.
    ``use_stash``: take the preview a finalising rank stashed for a raster where there is one.
    ``mode``: the ``previews`` key (:func:`previewed`).
    ``areas``: each raster's ``aoi=`` in map coordinates, outlined; None without.
    """
    areas = areas or {}
    stems = output_names(list(raster_paths))
    index = {p: i for i, p in enumerate(raster_paths)}
    single = len(raster_paths) == 1
    chosen = previewed(raster_paths, mode)
    if mode == "auto" and len(chosen) < len(raster_paths):
        log.info(
            "previews of the first %d of %d inputs only; previews=all draws every one "
            "(about 50 ms and one PNG each), previews=none none",
            len(chosen),
            len(raster_paths),
        )
    written = []
    try:
        for path in sorted(chosen):
            out = run_dir / preview_name(None if single else stems[path])
            stashed = stash_path(run_dir, index[path])
            if use_stash and stashed.exists():
                os.replace(stashed, out)
                written.append(out)
                continue
            class_map = run_dir / "segmentation" / f"{stems[path]}.tif"
            drawn = _draw(
                out,
                path,
                task,
                batch=features.get(path),
                class_map=class_map,
                area=areas.get(path),
            )
            if drawn:
                written.append(out)
    finally:
        clear_stash(run_dir)
    return written
