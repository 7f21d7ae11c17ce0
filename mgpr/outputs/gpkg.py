"""GeoPackage output (QGIS's default vector format), built on node-local disk and moved into place.

A GeoPackage is an SQLite database: writing it takes file locks, which fail or corrupt on
parallel filesystems (Lustre without ``flock``, NFS). So the file is built in a private folder
under the node's temporary directory (``$TMPDIR``, which SLURM sites usually point at local disk)
and only copied to the run directory once complete: first to a hidden temporary name there, then
``os.replace`` onto the final name, so readers see the whole file or none.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mgpr.outputs.vector import FeatureBatch, VectorWriter, oriented_wkb


class GpkgWriter(VectorWriter):
    """Every layer in one ``<stem>.gpkg`` (GeoPackage 1.2, polygons).

    A layer's geometry type is set by its first batch: ``Polygon`` for rings (boxes) and for
    geometries batches of Polygons only, ``MultiPolygon`` when that batch holds any
    MultiPolygon (its Polygons are then stored as one-part MultiPolygons, as the GeoPackage
    spec asks of a typed layer). A later MultiPolygon for a ``Polygon`` layer is refused.
    """

    format_name = "gpkg"

    def __init__(self, run_dir: Path, stem: str) -> None:
        super().__init__(run_dir, stem)
        self._workdir: Path | None = None
        self._layers: dict[str, str] = {}  # layer -> its geometry type

    @property
    def final_path(self) -> Path:
        """Where the file appears after :meth:`commit`."""
        return self.run_dir / f"{self.stem}.gpkg"

    def _local_path(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="mgpr-gpkg-"))
        return self._workdir / f"{self.stem}.gpkg"

    def write(self, layer: str, crs_wkt: str | None, batch: FeatureBatch) -> None:
        """Append ``batch`` to ``layer`` in the node-local file."""
        import pyogrio.raw

        path = self._local_path()
        creating_file = not path.exists()
        wkb = oriented_wkb(batch)  # exterior rings counter-clockwise, as in GeoParquet
        if batch.rings is not None:  # boxes: the fast path, no geometry objects kept
            kind = "Polygon"
        else:
            kind = "MultiPolygon" if "MultiPolygon" in batch.geometry_types() else "Polygon"
        layer_kind = self._layers.setdefault(layer, kind)
        if layer_kind == "Polygon" and kind == "MultiPolygon":
            raise ValueError(f"layer {layer!r} holds Polygons; this batch has MultiPolygons")
        names = list(batch.fields)
        with warnings.catch_warnings():
            # crs_wkt=None: a raster without CRS, already reported once (pixel coordinates).
            warnings.filterwarnings(
                "ignore", message="'crs' was not provided", category=UserWarning
            )
            if any(np.ndim(batch.fields[k]) == 2 for k in names):
                if layer_kind != "Polygon":
                    raise ValueError(f"layer {layer!r}: vector columns need Polygon features")
                pyogrio.raw.write_arrow(
                    _arrow_table(wkb, batch),
                    str(path),
                    layer=layer,
                    driver="GPKG",
                    geometry_name="geometry",
                    geometry_type=layer_kind,
                    crs=crs_wkt,
                    append=not creating_file,
                    dataset_options={"VERSION": "1.2"} if creating_file else None,
                )
                return
            pyogrio.raw.write(
                str(path),
                geometry=wkb,
                field_data=[np.asarray(batch.fields[k]) for k in names],
                fields=names,
                crs=crs_wkt,
                geometry_type=layer_kind,
                layer=layer,
                driver="GPKG",
                append=not creating_file,
                promote_to_multi=layer_kind == "MultiPolygon",
                # GeoPackage 1.2 opens without warnings in older GDAL/QGIS releases too.
                dataset_options={"VERSION": "1.2"} if creating_file else None,
            )

    def commit(self) -> list[Path]:
        """Copy the finished file next to its final name, then rename it onto it."""
        if self._workdir is None:
            return []
        local = self._local_path()
        hidden = self.run_dir / f".tmp-{os.getpid()}-{self.stem}.gpkg"
        try:
            shutil.copyfile(local, hidden)
            with open(hidden, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(hidden, self.final_path)
        finally:
            hidden.unlink(missing_ok=True)
            self.abort()
        return [self.final_path]

    def abort(self) -> None:
        """Remove the node-local folder."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _arrow_table(wkb: np.ndarray, batch: FeatureBatch) -> Any:
    """The batch as an Arrow table for OGR: WKB geometry, its columns, vectors as BLOBs.

    A (N, D) float32 column becomes one BLOB of D little-endian float32 per row (read back
    with ``numpy.frombuffer(blob, "<f4")``): a GeoPackage has no array type, and D columns
    would pass SQLite's 2,000-column limit for a 2048-feature embedding. Built from the
    array's own buffer (64-bit offsets: a million 8 KiB vectors pass 2 GiB), no copy per row.
    """
    import pyarrow as pa

    columns: dict[str, Any] = {"geometry": pa.array(list(wkb), pa.binary())}
    for name, values in batch.fields.items():
        column = np.asarray(values)
        if column.ndim == 2:
            n, dim = column.shape
            data = np.ascontiguousarray(column, "<f4")
            offsets = np.arange(n + 1, dtype=np.int64) * (dim * 4)
            columns[name] = pa.Array.from_buffers(
                pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
            )
        elif column.dtype == object:
            columns[name] = pa.array([str(v) for v in column], pa.string())
        else:
            columns[name] = pa.array(column)
    return pa.table(columns)
