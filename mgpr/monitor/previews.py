"""The run's quicklooks: one ``preview.png`` per input, after the merge, for every task.

Detection and classification read their features back from the merged output (the GeoPackage's
layers, else the GeoParquet files; each feature's ``source`` column names its raster), so the
preview shows what was written; segmentation draws the input's class map COG (read decimated
from its overviews). Names: ``preview.png`` for a run with one input, ``preview_<stem>.png``
(:func:`~mgpr.monitor.preview.preview_name`, the class map's unique stem) for each of several.

A preview is a convenience: one that cannot be drawn is logged as a warning and the run goes on.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rasterio.errors import NotGeoreferencedWarning

from mgpr.monitor.preview import preview_name, write_preview
from mgpr.tasks.segmentation import output_names

log = logging.getLogger(__name__)

#: The column that colours each task's features (its top-1 label).
LABEL_COLUMNS: dict[str, str] = {"detection": "label", "classification": "label_1"}


def _read_features(outputs: Sequence[Path], layers: Sequence[str], label: str) -> pa.Table | None:
    """Every feature of the merged output: ``geometry`` (WKB), ``source``, ``label``."""
    tables = []
    for path in outputs:
        if path.suffix == ".gpkg":
            import pyogrio

            for layer in layers:
                _meta, _fids, geom, data = pyogrio.raw.read(
                    path, layer=layer, columns=["source", label]
                )
                tables.append(pa.table({"geometry": geom, "source": data[0], "label": data[1]}))
            break  # the GeoParquet files (output_format=both) hold the same features
    else:
        for path in outputs:
            if path.suffix == ".parquet":
                t = pq.read_table(path, columns=["geometry", "source", label])
                tables.append(t.rename_columns(["geometry", "source", "label"]))
    if not tables:
        return None
    return pa.concat_tables([t.cast(tables[0].schema) for t in tables])


def write_previews(
    run_dir: Path,
    task: str,
    raster_paths: Sequence[str],
    outputs: Sequence[Path],
    layers: Sequence[str],
) -> list[Path]:
    """One preview per input raster into ``run_dir``; returns those written."""
    stems = output_names(list(raster_paths))
    single = len(raster_paths) == 1
    features = None
    if task in LABEL_COLUMNS:
        try:
            features = _read_features(outputs, layers, LABEL_COLUMNS[task])
        except Exception as exc:  # noqa: BLE001 - a quicklook never fails a run
            log.warning("preview: could not read the results back (%s); drawing the inputs", exc)
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
                    mine = None
                    if features is not None:
                        mine = features.filter(pc.equal(features["source"], path))
                    write_preview(out, path, kind=task, features=mine)
            written.append(out)
        except Exception as exc:  # noqa: BLE001 - a quicklook never fails a run
            log.warning("preview of %s not written: %s", path, exc)
    return written
