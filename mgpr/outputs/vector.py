"""The seam between a task's merge and the vector files it produces: layers of polygon features.

A task's merge turns each raster's final records into a :class:`FeatureBatch` (polygon rings in
the raster's CRS plus attribute columns) and hands it to every :class:`VectorWriter` the run's
``output_format`` selects (:func:`mgpr.outputs.formats.vector_writers`). A writer knows one file
format and nothing about tasks; adding a format is one new writer module.

Writers never expose a half-written file: they build their files under temporary names (on
node-local disk where the format needs locks, such as the SQLite inside a GeoPackage) and move
them into the run directory in :meth:`VectorWriter.commit`, each with ``os.replace``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Polygons and their attributes, ready to write.

    Attributes:
        rings: (N, 5, 2) float64 closed rings (first point == last), x then y, in the layer's
            CRS (map units; raster pixel corner coordinates for a raster without a CRS).
        fields: column name -> (N,) array: float64, int64, or object (str) columns; every column
            has N rows and the same columns come in every batch of one layer.
    """

    rings: npt.NDArray[np.float64]
    fields: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        n = len(self.rings)
        if self.rings.shape != (n, 5, 2):
            raise ValueError(f"FeatureBatch needs rings of shape (N, 5, 2), got {self.rings.shape}")
        for name, column in self.fields.items():
            if len(column) != n:
                raise ValueError(f"FeatureBatch column {name!r} has {len(column)} rows, not {n}")

    def __len__(self) -> int:
        return len(self.rings)

    @classmethod
    def concat(cls, batches: list[FeatureBatch]) -> FeatureBatch:
        """One batch holding every row of ``batches`` in order (they share their columns)."""
        if not batches:
            return cls(np.empty((0, 5, 2), np.float64), {})
        names = list(batches[0].fields)
        return cls(
            np.concatenate([b.rings for b in batches]).reshape(-1, 5, 2),
            {k: np.concatenate([np.asarray(b.fields[k]) for b in batches]) for k in names},
        )


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
