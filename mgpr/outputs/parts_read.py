"""Reading published parts: manifests (done set, progress, the ledger) and payload records.

Only published files are read: names starting with a dot are temporaries of a writer that is
still at work (or was killed), and payload files no manifest names are leftovers of a writer
killed between its payload and its manifest; both are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

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


def count_written_tiles(run_dir: Path) -> int:
    """Manifest rows of every published part (repeats included)."""
    return sum(pq.read_metadata(p.manifest).num_rows for p in list_parts(run_dir))


def read_records(
    run_dir: Path,
    picks: Mapping[str, Collection[str]],
    parts: Mapping[str, Part],
    suffix: str,
    schema: pa.Schema,
) -> pa.Table:
    """The payload rows of the picked tiles, each tile's rows from its picked part only.

    Args:
        run_dir: the run directory.
        picks: part name -> tile keys whose records are taken from that part.
        parts: part name -> :class:`Part`.
        suffix: the payload file's suffix (``.records.parquet``).
        schema: the records' schema (every table has a ``tile_key`` column).

    Returns:
        The rows, in part-name order (callers sort for a deterministic output).
    """
    tables = []
    folder = parts_dir(run_dir)
    for name in sorted(picks):
        keys = picks[name]
        file = f"{name}{suffix}"
        if not keys or file not in parts[name].files:
            continue
        table = pq.read_table(folder / file, schema=schema)
        mask = pc.is_in(table["tile_key"], value_set=pa.array(sorted(keys), pa.string()))
        tables.append(table.filter(mask))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)
