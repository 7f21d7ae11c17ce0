"""Per-rank part files: each rank publishes its finished chunks under ``<run_dir>/parts/``.

Why: a shared filesystem (Lustre, NFS, GPFS) gives no safe locks and no coherent view of a file
another host is writing. So every file here has ONE writer (its rank), is written under a hidden
temporary name, fsync'ed, ``os.replace``'d onto its final name and the folder fsync'ed; nobody
ever reads a file before its rename, and nothing takes a lock (no SQLite, no WAL, no flock).

A chunk (:class:`PartWriter.publish`) is published as:

1. its payload file(s), chosen by the task (a records table ``<part>.records.parquet`` for the
   vector tasks; raster part files for segmentation), through a :class:`PartSink`;
2. then its manifest ``<part>.manifest.parquet`` (:data:`MANIFEST_SCHEMA`), one row per tile the
   chunk completes, naming its payload files in the schema metadata.

A tile is done iff it is in a published manifest: a writer killed between 1 and 2 leaves
payload files no manifest names (ignored), one killed mid-write leaves a hidden temp file
(ignored). Part names are unique across requeues and world sizes:
``r<rank>-<UTC stamp>-<pid>-<random hex>-<seq>``, so two runs never write one file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from mgpr.geo.tiling import Tile

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
MANIFEST_SUFFIX = ".manifest.parquet"
RECORDS_SUFFIX = ".records.parquet"
#: Schema metadata key of a manifest: JSON ``{"files": [payload file names], "rank": r}``.
MANIFEST_META_KEY = b"mgpr.part"
#: Tile statuses by the int code the data pipeline uses (0 done, 1 empty, 2 failed).
STATUS_NAMES: tuple[str, ...] = ("done", "empty", "failed")

MANIFEST_SCHEMA = pa.schema(
    [
        ("tile_key", pa.string()),  # TileId.key(): "<path>::r<row>c<col>"
        ("path", pa.string()),  # the raster, as the user gave it
        ("row", pa.int32()),  # tile grid row (not pixels)
        ("col", pa.int32()),  # tile grid column
        ("status", pa.string()),  # done | empty (all nodata, model not run) | failed
        ("reason", pa.string()),  # why it failed, else ""
        ("n_records", pa.int64()),  # records of the tile in the payload (boxes, classes, ...)
    ]
)


class OutcomeLike(Protocol):
    """What a part writer needs of a tile outcome (``mgpr.tasks.base.TileOutcome``)."""

    tile: Tile
    status: int
    reason: str


#: A task's payload hook: writes the chunk's payload through the sink, returns records per tile.
PayloadWriter = Callable[[Sequence[OutcomeLike], "PartSink"], Mapping[str, int]]


def parts_dir(run_dir: Path) -> Path:
    """Folder of every rank's part files."""
    return run_dir / PARTS_DIR


def part_prefix(rank: int) -> str:
    """``r<rank>-<UTC stamp>-<pid>-<random hex>``: unique per process, requeue and world size."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"r{rank}-{stamp}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_file(final: Path, write: Callable[[Path], None], durable: bool = True) -> Path:
    """Write through ``write(temp_path)``, fsync, rename onto ``final``, fsync the folder.

    The temp name is hidden (``.<name>.tmp``): readers skip names starting with a dot.
    ``durable=False`` keeps the atomic rename (a reader sees the whole file or none) but not
    the two fsyncs, for files no later job reads (a merge's feature files: rank 0 clears them
    before every merge); on a parallel filesystem the fsyncs cost milliseconds per file.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(final.parent)
    return final


def remove_leftover_temps(run_dir: Path) -> int:
    """Remove the hidden temp files (``.<name>.tmp``) a killed writer left in ``parts/``.

    Call on rank 0 after the merge, when every rank of the run has finished (and the run lock
    keeps any other run out): a temp file then belongs to a process that died before its
    rename, and its tiles were predicted again. Returns how many were removed.
    """
    folder = parts_dir(run_dir)
    removed = 0
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            continue  # gone already, or not ours to remove: never a failed run
    if removed:
        log.info("removed %d temp file(s) of killed writers from %s", removed, folder)
    return removed


def write_parquet(table: pa.Table, path: Path) -> None:
    """One Parquet file, zstd-compressed (readers need nothing beyond pyarrow)."""
    pq.write_table(table, path, compression="zstd")


class PartSink:
    """Publishes the payload files of one chunk, each named ``<part name><suffix>``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.files: list[str] = []

    def path_for(self, suffix: str) -> Path:
        """Final path of a payload file of this chunk (``suffix`` such as ``.records.parquet``)."""
        return self.folder / f"{self.name}{suffix}"

    def publish(self, suffix: str, write: Callable[[Path], None]) -> Path:
        """Publish one payload file written by ``write(temp_path)`` (any format)."""
        path = publish_file(self.path_for(suffix), write)
        self.files.append(path.name)
        return path

    def publish_table(self, table: pa.Table, suffix: str = RECORDS_SUFFIX) -> Path:
        """Publish a records table as Parquet."""
        return self.publish(suffix, lambda tmp: write_parquet(table, tmp))


def manifest_table(
    outcomes: Sequence[OutcomeLike], n_records: Mapping[str, int], files: Sequence[str], rank: int
) -> pa.Table:
    """The manifest of one chunk: a row per tile, payload files in the schema metadata."""
    keys = [o.tile.id.key() for o in outcomes]
    columns = [
        pa.array(keys, pa.string()),
        pa.array([o.tile.id.path for o in outcomes], pa.string()),
        pa.array([o.tile.id.row for o in outcomes], pa.int32()),
        pa.array([o.tile.id.col for o in outcomes], pa.int32()),
        pa.array([STATUS_NAMES[o.status] for o in outcomes], pa.string()),
        pa.array([o.reason or "" for o in outcomes], pa.string()),
        pa.array([int(n_records.get(k, 0)) for k in keys], pa.int64()),
    ]
    meta = {MANIFEST_META_KEY: json.dumps({"files": list(files), "rank": rank}).encode()}
    return pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA.with_metadata(meta))


class PartWriter:
    """One rank's chunk publisher (used by one thread: the rank's background writer).

    Args:
        run_dir: the run directory (identical on every rank).
        rank: global rank (the first field of every part name).
        payload: the task's hook writing a chunk's payload (see :data:`PayloadWriter`).
    """

    def __init__(self, run_dir: Path, rank: int, payload: PayloadWriter) -> None:
        self.folder = parts_dir(run_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.payload = payload
        self.prefix = part_prefix(rank)
        self.seq = 0

    def publish(self, outcomes: Sequence[OutcomeLike]) -> int:
        """Publish one chunk (payload first, manifest last); returns the records written."""
        if not outcomes:
            return 0
        self.seq += 1
        sink = PartSink(self.folder, f"{self.prefix}-{self.seq:06d}")
        n_records = self.payload(outcomes, sink)
        table = manifest_table(outcomes, n_records, sink.files, self.rank)
        publish_file(sink.path_for(MANIFEST_SUFFIX), lambda tmp: write_parquet(table, tmp))
        return int(sum(n_records.values()))
