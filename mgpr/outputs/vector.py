"""The seam between a task's merge and the vector files it produces: layers of polygon features.

A task's merge turns each raster's final records into a :class:`FeatureBatch` (box rings or
general polygons in the raster's CRS plus attribute columns) and hands it to every
:class:`VectorWriter` the run's ``output_format`` selects
(:func:`mgpr.outputs.formats.vector_writers`). A writer knows one file format and nothing about
tasks; adding a format is one new writer module.

Writers never expose a half-written file: they build their files under temporary names (on
node-local disk where the format needs locks, such as the SQLite inside a GeoPackage) and move
them into the run directory in :meth:`VectorWriter.commit`, each with ``os.replace``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import shapely

#: GeoParquet / OGR names of the geometry types a FeatureBatch may hold (shapely type ids).
_TYPE_NAMES = {3: "Polygon", 6: "MultiPolygon"}


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Polygons and their attributes, ready to write: boxes as rings, or general geometries.

    Two forms, one of them per batch:

    * **rings** (boxes: detections, classification footprints): ``FeatureBatch(rings, fields)``;
      a plain (N, 5, 2) array, so that 10^6 boxes cost no Python object each (the detection
      merge's hot path);
    * **geometries** (segmentation polygons: holes, several parts):
      :meth:`of_geometries` ``(geoms, fields)``; shapely Polygons / MultiPolygons.

    Attributes:
        rings: (N, 5, 2) float64 closed rings (first point == last), x then y, in the layer's
            CRS (map units; raster pixel corner coordinates for a raster without a CRS); None
            for a geometries batch.
        fields: column name -> (N,) array: float64, int64, or object (str) columns; or a
            (N, D) float32 array, a vector per feature (an embedding: GeoParquet stores it as a
            fixed-size list of D float32, GeoPackage as a BLOB of D little-endian float32).
            Every column has N rows and the same columns come in every batch of one layer.
        geometries: (N,) object array of shapely Polygons / MultiPolygons (same CRS rule as
            ``rings``); None for a rings batch.
    """

    rings: npt.NDArray[np.float64] | None
    fields: Mapping[str, np.ndarray]
    geometries: npt.NDArray[np.object_] | None = None

    def __post_init__(self) -> None:
        if (self.rings is None) == (self.geometries is None):
            raise ValueError("FeatureBatch needs rings or geometries (exactly one of them)")
        if self.rings is not None:
            n = len(self.rings)
            if self.rings.shape != (n, 5, 2):
                raise ValueError(
                    f"FeatureBatch needs rings of shape (N, 5, 2), got {self.rings.shape}"
                )
        else:
            assert self.geometries is not None
            n = len(self.geometries)
            if self.geometries.ndim != 1:
                raise ValueError(f"FeatureBatch needs (N,) geometries, got {self.geometries.shape}")
            kinds = shapely.get_type_id(self.geometries) if n else np.empty(0, np.int64)
            bad = ~np.isin(kinds, list(_TYPE_NAMES))
            if bad.any():
                what = self.geometries[int(np.argmax(bad))]
                kind = "None" if what is None else what.geom_type
                raise ValueError(f"FeatureBatch geometries must be (Multi)Polygons, got {kind}")
        for name, column in self.fields.items():
            if len(column) != n:
                raise ValueError(f"FeatureBatch column {name!r} has {len(column)} rows, not {n}")
            if np.ndim(column) == 2 and np.asarray(column).dtype != np.float32:
                raise ValueError(f"FeatureBatch vector column {name!r} must be float32")
            if np.ndim(column) > 2:
                raise ValueError(f"FeatureBatch column {name!r} has {np.ndim(column)} dimensions")

    @classmethod
    def of_geometries(
        cls, geometries: Sequence[shapely.Geometry] | np.ndarray, fields: Mapping[str, np.ndarray]
    ) -> FeatureBatch:
        """A geometries batch (see the class docstring) from any sequence of shapely polygons."""
        geoms = np.empty(len(geometries), dtype=object)
        geoms[:] = list(geometries)
        return cls(None, fields, geoms)

    def __len__(self) -> int:
        if self.rings is not None:
            return len(self.rings)
        assert self.geometries is not None
        return len(self.geometries)

    @property
    def is_rings(self) -> bool:
        """True for a rings (boxes) batch."""
        return self.rings is not None

    def shapes(self) -> npt.NDArray[np.object_]:
        """(N,) shapely geometries of either form (boxes are built here: slow for 10^6)."""
        if self.geometries is not None:
            return self.geometries
        assert self.rings is not None
        if not len(self.rings):
            return np.empty(0, dtype=object)
        return np.asarray(shapely.polygons(np.asarray(self.rings, dtype=np.float64)), dtype=object)

    def bounds(self) -> npt.NDArray[np.float64]:
        """(N, 4) ``xmin, ymin, xmax, ymax`` of every feature, layer CRS."""
        if self.rings is not None:
            rings = np.asarray(self.rings, dtype=np.float64)
            lo, hi = rings.min(axis=1), rings.max(axis=1)
            return np.column_stack([lo, hi]) if len(rings) else np.empty((0, 4))
        return np.asarray(shapely.bounds(self.shapes()), dtype=np.float64).reshape(-1, 4)

    def take(self, keep: npt.NDArray[np.bool_]) -> FeatureBatch:
        """The rows where ``keep`` is True, in order (the same form, rings or geometries)."""
        fields = {k: np.asarray(v)[keep] for k, v in self.fields.items()}
        if self.rings is not None:
            return FeatureBatch(self.rings[keep], fields)
        assert self.geometries is not None
        return FeatureBatch(None, fields, self.geometries[keep])

    def rows(self, start: int, stop: int) -> FeatureBatch:
        """Rows ``start`` to ``stop`` (views, no copy; the same form, rings or geometries)."""
        fields = {k: np.asarray(v)[start:stop] for k, v in self.fields.items()}
        if self.rings is not None:
            return FeatureBatch(self.rings[start:stop], fields)
        assert self.geometries is not None
        return FeatureBatch(None, fields, self.geometries[start:stop])

    def geometry_types(self) -> tuple[str, ...]:
        """Sorted names of the geometry types present (a rings batch: ``("Polygon",)``)."""
        if self.rings is not None:
            return ("Polygon",)
        assert self.geometries is not None
        if not len(self.geometries):
            return ()
        ids = np.unique(shapely.get_type_id(self.geometries))
        return tuple(sorted(_TYPE_NAMES[int(i)] for i in ids))

    @classmethod
    def concat(cls, batches: list[FeatureBatch]) -> FeatureBatch:
        """One batch holding every row of ``batches`` in order (they share their columns).

        All rings batches give a rings batch (no geometry objects made); any geometries batch
        among them makes the result a geometries batch.
        """
        if not batches:
            return cls(np.empty((0, 5, 2), np.float64), {})
        # An empty batch's vector column is (0, 0): its length D is unknown without rows.
        batches = [b for b in batches if len(b)] or batches[:1]
        names = list(batches[0].fields)
        fields = {k: np.concatenate([np.asarray(b.fields[k]) for b in batches]) for k in names}
        if all(b.rings is not None for b in batches):
            rings = [b.rings for b in batches if b.rings is not None]
            return cls(np.concatenate(rings).reshape(-1, 5, 2), fields)
        return cls(None, fields, np.concatenate([b.shapes() for b in batches]))


class VectorWriter(abc.ABC):
    """One vector output format for one run.

    Args:
        run_dir: the run directory the final files go to.
        stem: file name without suffix for formats that hold every layer in one file
            (``predictions`` -> ``predictions.gpkg``); one-file-per-layer formats name their files
            after the layers instead.
    """

    #: Short name used by ``output_format`` (``gpkg``, ``parquet``).
    format_name: str = ""

    def __init__(self, run_dir: Path, stem: str) -> None:
        self.run_dir = run_dir
        self.stem = stem

    @abc.abstractmethod
    def write(self, layer: str, crs_wkt: str | None, batch: FeatureBatch) -> None:
        """Append ``batch`` to ``layer`` (created on first use with ``crs_wkt``; None = no CRS).

        A layer may be written in several batches; every batch of a layer has the same CRS and
        columns. An empty batch still creates the layer.
        """

    @abc.abstractmethod
    def commit(self) -> list[Path]:
        """Move every finished file into the run directory; returns their final paths."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Delete the temporaries; the run directory is left as it was."""


def counterclockwise(rings: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``rings`` with every clockwise ring reversed (shoelace area < 0), so all are CCW.

    Args:
        rings: (N, 5, 2) closed rings, map ``(x, y)``.

    Returns:
        (N, 5, 2) the same rings, counter-clockwise; the input is not changed.
    """
    x, y = rings[:, :, 0], rings[:, :, 1]
    twice_area = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(axis=1)
    clockwise = twice_area < 0
    if not clockwise.any():
        return rings
    out = rings.copy()
    out[clockwise] = rings[clockwise, ::-1]
    return out


def oriented_wkb(batch: FeatureBatch) -> np.ndarray:
    """The batch's polygons as WKB, exterior rings counter-clockwise and holes clockwise.

    The one orientation rule of every writer (GeoPackage and GeoParquet hold the same
    features): a raster whose transform flips the axes (south-up, east-left) traces its
    regions' rings the other way round in map coordinates.
    """
    if len(batch) == 0:
        return np.empty(0, dtype=object)
    if batch.rings is not None:
        rings = counterclockwise(np.asarray(batch.rings, dtype=np.float64))
        return shapely.to_wkb(shapely.polygons(rings))
    return shapely.to_wkb(shapely.orient_polygons(batch.shapes(), exterior_cw=False))
