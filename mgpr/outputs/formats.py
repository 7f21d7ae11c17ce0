"""Which vector writers a run uses: ``output_format`` -> :class:`~mgpr.outputs.vector.VectorWriter`.

Adding a format: one writer module in ``outputs/`` and one entry in :data:`WRITERS`;
``output_format=both`` means every format in :data:`BOTH`.
"""

from __future__ import annotations

from pathlib import Path

from mgpr.errors import ConfigError
from mgpr.outputs.geoparquet import GeoParquetWriter
from mgpr.outputs.gpkg import GpkgWriter
from mgpr.outputs.vector import VectorWriter

#: format name -> writer class.
WRITERS: dict[str, type[VectorWriter]] = {"gpkg": GpkgWriter, "parquet": GeoParquetWriter}
#: What ``output_format=both`` writes.
BOTH: tuple[str, ...] = ("gpkg", "parquet")


def output_formats() -> tuple[str, ...]:
    """The values ``output_format`` accepts."""
    return (*WRITERS, "both")


def vector_writers(
    output_format: str, run_dir: Path, stem: str = "predictions"
) -> list[VectorWriter]:
    """One writer per format that ``output_format`` selects, in a fixed order."""
    if output_format == "both":
        names: tuple[str, ...] = BOTH
    elif output_format in WRITERS:
        names = (output_format,)
    else:
        raise ConfigError(
            f"output_format={output_format} is not a known output format; "
            f"use one of {', '.join(output_formats())}"
        )
    return [WRITERS[name](run_dir, stem) for name in names]
