"""The run's quicklooks: one ``preview.png`` per input, after the merge, for every task.

Detection and classification get each raster's merged features from the merge, in memory (what
the writers wrote; nothing re-opens the GeoPackage, whose SQLite would take file locks in the run
directory); segmentation draws the input's class map COG (read decimated
from its overviews). Names: ``preview.png`` for a run with one input, ``preview_<stem>.png``
(:func:`~mgpr.monitor.preview.preview_name`, the class map's unique stem) for each of several.

A preview is a convenience: one that cannot be drawn is logged as a warning and the run goes on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely
from rasterio.errors import NotGeoreferencedWarning

from mgpr.monitor.preview import preview_name, write_preview
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.segmentation import output_names

log = logging.getLogger(__name__)

#: The column that colours each task's features (its top-1 label).
LABEL_COLUMNS: dict[str, str] = {"detection": "label", "classification": "label_1"}


def _table(batch: FeatureBatch, label: str) -> pa.Table:
    """A raster's features as ``write_preview`` takes them: WKB polygons and their label."""
    geoms = shapely.polygons(np.asarray(batch.rings, dtype=np.float64))
    labels = batch.fields.get(label)
    return pa.table(
        {
            "geometry": pa.array(shapely.to_wkb(geoms).tolist(), pa.binary()),
            "label": [str(v) for v in labels] if labels is not None else ["result"] * len(batch),
        }
    )


def write_previews(
    run_dir: Path,
    task: str,
    raster_paths: Sequence[str],
    features: Mapping[str, FeatureBatch],
) -> list[Path]:
    """One preview per input raster into ``run_dir``; returns those written.

    ``features``: each raster's merged features (vector tasks), as the merge wrote them.
    """
    stems = output_names(list(raster_paths))
    single = len(raster_paths) == 1
    written = []
    for path in sorted(raster_paths):
        out = run_dir / preview_name(None if single else stems[path])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)  # pixel coordinates
                if task == "segmentation":
                    class_map = run_dir / "segmentation" / f"{stems[path]}.tif"
                    found = class_map if class_map.exists() else None
                    write_preview(out, path, kind=task, class_map=found)
                else:
                    batch = features.get(path)
                    mine = _table(batch, LABEL_COLUMNS.get(task, "label")) if batch else None
                    write_preview(out, path, kind=task, features=mine)
            written.append(out)
        except Exception as exc:  # noqa: BLE001 - a quicklook never fails a run
            log.warning("preview of %s not written: %s", path, exc)
    return written
