"""Reading published parts: manifests (done set, progress, the ledger) and payload records.

Only published files are read: names starting with a dot are temporaries of a writer that is
still at work (or was killed), and payload files no manifest names are leftovers of a writer
killed between its payload and its manifest; both are ignored.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mgpr.outputs.parts import MANIFEST_META_KEY, MANIFEST_SCHEMA, MANIFEST_SUFFIX, parts_dir

#: Best status first: a tile in several parts keeps its best (done > empty > failed).
STATUS_ORDER: dict[str, int] = {"done": 0, "empty": 1, "failed": 2}


@dataclass(frozen=True, slots=True)
class Part:
    """One published chunk.

    Attributes:
        name: ``r<rank>-<stamp>-<pid>-<hex>-<seq>``.
        manifest: its manifest file.
        files: its payload files (names in the parts folder).
    """

    name: str
    manifest: Path
    files: tuple[str, ...]


def list_parts(run_dir: Path) -> list[Part]:
    """Every published part of a run, sorted by name."""
    folder = parts_dir(run_dir)
    if not folder.is_dir():
        return []
    parts = []
    for path in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
        if path.name.startswith("."):
            continue
        meta = pq.read_schema(path).metadata or {}
        info = json.loads(meta.get(MANIFEST_META_KEY, b"{}"))
        parts.append(Part(path.name[: -len(MANIFEST_SUFFIX)], path, tuple(info.get("files", ()))))
    return parts


def read_manifests(run_dir: Path, parts: list[Part] | None = None) -> pa.Table:
    """Every manifest row of the run with a ``part`` column (the part's name), in part order."""
    tables = []
    for part in list_parts(run_dir) if parts is None else parts:
        table = pq.read_table(part.manifest, schema=MANIFEST_SCHEMA)
        tables.append(table.append_column("part", pa.array([part.name] * len(table), pa.string())))
    if not tables:
        return MANIFEST_SCHEMA.empty_table().append_column("part", pa.array([], pa.string()))
    return pa.concat_tables(tables).replace_schema_metadata(None)


def tile_statuses(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Best status of every tile across all parts: ``{tile_key: (status, reason)}``.

    A tile written twice (failed once, done on a resume) keeps its best status.
    """
    table = read_manifests(run_dir)
    best: dict[str, tuple[str, str]] = {}
    for key, status, reason in zip(
        table["tile_key"].to_pylist(),
        table["status"].to_pylist(),
        table["reason"].to_pylist(),
        strict=True,
    ):
        old = best.get(key)
        if old is None or STATUS_ORDER[status] < STATUS_ORDER[old[0]]:
            best[key] = (status, reason or "")
    return best


def finished_tile_keys(run_dir: Path) -> set[str]:
    """Tiles in a published part as done or empty; failed tiles are retried by a resume."""
    return {k for k, (s, _) in tile_statuses(run_dir).items() if s in ("done", "empty")}


#: Where :func:`set_aside_damaged_parts` moves a part none of whose files may be trusted.
DAMAGED_DIR = "damaged"


def set_aside_damaged_parts(run_dir: Path) -> list[tuple[str, str, int]]:
    """Move published parts with an unreadable manifest or payload into ``parts/damaged/``.

    A part counts as published by its manifest; a disk hiccup, a truncated copy or a deleted
    payload left a manifest that crashed the resume (pyarrow's traceback at start-up) or one
    whose payload the merge could not read (every re-run stopped on the same file). Moved
    aside, manifest first, the part is unpublished: its tiles are predicted again, and its
    files stay there for whoever wants to look. Call on rank 0 before the tiles left are
    decided, under the run lock (no writer of this run has started).

    Checks: the manifest reads whole (it is small); each payload file it names exists, and a
    Parquet payload's footer or a raster payload's header reads (cheap: no data is decoded).

    Returns:
        ``(part name, what is wrong, manifest rows)`` of each part set aside.
    """
    folder = parts_dir(run_dir)
    if not folder.is_dir():
        return []
    damaged: list[tuple[str, str, int]] = []
    for path in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
        if path.name.startswith("."):
            continue
        name = path.name[: -len(MANIFEST_SUFFIX)]
        rows, problem = _check_part(folder, path)
        if problem is None:
            continue
        target = folder / DAMAGED_DIR
        target.mkdir(exist_ok=True)
        files = [path] + sorted(folder.glob(f"{name}.*"))
        for file in dict.fromkeys(files):
            if file.exists():
                os.replace(file, target / file.name)
        damaged.append((name, problem, rows))
    return damaged


def _check_part(folder: Path, manifest: Path) -> tuple[int, str | None]:
    """``(manifest rows, None)`` for a readable part, else ``(rows or 0, what is wrong)``."""
    try:
        meta = pq.read_schema(manifest).metadata or {}
        rows = pq.read_table(manifest, schema=MANIFEST_SCHEMA).num_rows
        files = json.loads(meta.get(MANIFEST_META_KEY, b"{}")).get("files", ())
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is damaged
        return 0, f"{manifest.name} is unreadable ({_reason(exc)})"
    for file in files:
        path = folder / file
        if not path.is_file():
            return rows, f"{file} is missing"
        try:
            if file.endswith(".parquet"):
                pq.read_metadata(path)
            elif file.endswith(".tif"):
                import rasterio

                with rasterio.open(path):
                    pass
            elif path.stat().st_size == 0:
                return rows, f"{file} is empty"
        except Exception as exc:  # noqa: BLE001 - any unreadable payload is damaged
            return rows, f"{file} is unreadable ({_reason(exc)})"
    return rows, None


def _reason(exc: BaseException) -> str:
    """The first line of an exception, short: ``ArrowInvalid: Parquet magic bytes not found``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 120 else text[:117].rsplit(" ", 1)[0] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def count_written_tiles(run_dir: Path) -> int:
    """Manifest rows of every published part (repeats included)."""
    return sum(pq.read_metadata(p.manifest).num_rows for p in list_parts(run_dir))


#: Bytes of part payloads a :class:`RecordsReader` keeps read at most, besides the part in use
#: (Arrow buffers: ~2.5M detection rows without outlines; Mask R-CNN outlines make rows larger).
CACHED_BYTES = 256 * 2**20


@dataclass(frozen=True, slots=True)
class _PartRows:
    """One part's payload sorted by tile key (stably: a tile's rows keep their order)."""

    table: pa.Table
    spans: dict[str, tuple[int, int]]  # tile key -> (first row, rows)


class RecordsReader:
    """The payload rows of picked tiles, each part file read once while its rasters are merged.

    A folder of many small rasters puts the tiles of hundreds of consecutive rasters in one
    part, so reading a raster's part for each raster read every part hundreds of times (20,000
    chips with 3 boxes each: the merge read 79 parts 20,000 times). The reader keeps the parts
    it read last, up to :data:`CACHED_BYTES` besides the one in use, each indexed by tile key.

    Args:
        run_dir: the run directory.
        parts: part name -> :class:`Part`.
        suffix: the payload file's suffix (``.records.parquet``).
        schema: the records' schema (every table has a ``tile_key`` column).
        max_bytes: bytes of tables kept besides the part in use.
    """

    def __init__(
        self,
        run_dir: Path,
        parts: Mapping[str, Part],
        suffix: str,
        schema: pa.Schema,
        max_bytes: int = CACHED_BYTES,
    ) -> None:
        self._folder = parts_dir(run_dir)
        self._parts = parts
        self._suffix = suffix
        self._schema = schema
        self._max_bytes = max_bytes
        self._cache: OrderedDict[str, _PartRows] = OrderedDict()

    def read(self, picks: Mapping[str, Collection[str]]) -> pa.Table:
        """The rows of ``picks`` (part name -> tile keys taken from that part).

        Returns:
            The rows, part by part in name order and tile keys sorted within a part (callers
            sort for a deterministic output).
        """
        tables = []
        for name in sorted(picks):
            keys = picks[name]
            if not keys or f"{name}{self._suffix}" not in self._parts[name].files:
                continue
            rows = self._part(name)
            spans = [rows.spans[k] for k in sorted(keys) if k in rows.spans]
            if not spans:
                continue
            first = np.array([s for s, _ in spans], dtype=np.int64)
            count = np.array([n for _, n in spans], dtype=np.int64)
            # every row of every span: first[i] + 0..count[i]-1, without a Python loop over rows
            offsets = np.repeat(first - np.cumsum(count) + count, count)
            tables.append(rows.table.take(pa.array(offsets + np.arange(count.sum()))))
        if not tables:
            return self._schema.empty_table()
        return pa.concat_tables(tables)

    def _part(self, name: str) -> _PartRows:
        rows = self._cache.get(name)
        if rows is not None:
            self._cache.move_to_end(name)
            return rows
        table = pq.read_table(self._folder / f"{name}{self._suffix}", schema=self._schema)
        table = table.take(pc.sort_indices(table, [("tile_key", "ascending")]))
        keys = table["tile_key"].to_numpy(zero_copy_only=False)
        unique, first, count = np.unique(keys, return_index=True, return_counts=True)
        spans = {str(k): (int(f), int(n)) for k, f, n in zip(unique, first, count, strict=True)}
        rows = self._cache[name] = _PartRows(table, spans)
        held = sum(r.table.nbytes for r in self._cache.values())
        while len(self._cache) > 1 and held - table.nbytes > self._max_bytes:
            _, dropped = self._cache.popitem(last=False)
            held -= dropped.table.nbytes
        return rows
