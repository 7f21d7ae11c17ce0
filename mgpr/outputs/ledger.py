"""The merge's proof of exactly-once: every planned tile accounted for once, from one part.

The plan (every input's tile grid, as the run computed it) is matched against the published
manifests (:mod:`mgpr.outputs.parts_read`):

* each planned tile found in parts is accounted ONCE, as predicted (``done``), skipped
  (``empty``: all nodata) or ``failed``;
* a tile found in several parts (a chunk re-predicted after a requeue, a failed tile retried)
  keeps one entry, deterministically: the best status (done > empty > failed), ties broken by
  the lexicographically first part name; its records are then read from THAT part only, so a
  duplicate never reaches the output;
* a planned tile in no part is *missing*: the merge lists it in ``missing_tiles.txt`` and the
  run fails (exit 4); re-running the same command resumes and predicts only those tiles.

So ``planned == done + empty + failed + missing`` holds by construction, each tile once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mgpr.outputs.parts_read import STATUS_ORDER, Part, list_parts, read_manifests

log = logging.getLogger(__name__)

MISSING_FILE = "missing_tiles.txt"


@dataclass(frozen=True, slots=True)
class TileEntry:
    """The one accounted copy of a planned tile: its status, why, and the part it comes from."""

    status: str
    reason: str
    part: str
    n_records: int


@dataclass(slots=True)
class Ledger:
    """Every planned tile accounted once (see the module docstring).

    Attributes:
        planned: planned tile keys, in plan order.
        entries: tile key -> its kept entry (planned tiles found in a part).
        missing: planned keys in no part, in plan order.
        duplicates: extra copies dropped (a tile in k parts adds k - 1).
        unplanned: keys found in parts that the plan does not hold (ignored).
        parts: part name -> :class:`Part`.
    """

    planned: list[str]
    entries: dict[str, TileEntry] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    duplicates: int = 0
    unplanned: int = 0
    parts: dict[str, Part] = field(default_factory=dict)

    def count(self, status: str) -> int:
        """Planned tiles accounted with ``status``."""
        return sum(1 for e in self.entries.values() if e.status == status)

    def failed(self) -> list[tuple[str, str]]:
        """``(tile_key, reason)`` of every failed tile, sorted by key."""
        return sorted((k, e.reason) for k, e in self.entries.items() if e.status == "failed")

    def picks(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Part name -> the done tiles among ``keys`` whose records come from that part."""
        out: dict[str, list[str]] = {}
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None and entry.status == "done":
                out.setdefault(entry.part, []).append(key)
        return out


def build_ledger(run_dir: Path, planned: Iterable[str]) -> Ledger:
    """Account every planned tile against the run's published parts."""
    parts = list_parts(run_dir)
    ledger = Ledger(planned=list(planned), parts={p.name: p for p in parts})
    table = read_manifests(run_dir, parts)
    plan = set(ledger.planned)
    seen: set[str] = set()
    for key, status, reason, part, n in zip(
        table["tile_key"].to_pylist(),
        table["status"].to_pylist(),
        table["reason"].to_pylist(),
        table["part"].to_pylist(),
        table["n_records"].to_pylist(),
        strict=True,
    ):
        if key not in plan:
            ledger.unplanned += 1
            continue
        if key in seen:
            ledger.duplicates += 1
        seen.add(key)
        old = ledger.entries.get(key)
        if old is None or (STATUS_ORDER[status], part) < (STATUS_ORDER[old.status], old.part):
            ledger.entries[key] = TileEntry(status, reason or "", part, int(n))
    ledger.missing = [k for k in ledger.planned if k not in ledger.entries]
    accounted = ledger.count("done") + ledger.count("empty") + ledger.count("failed")
    if accounted + len(ledger.missing) != len(ledger.planned):  # the proof; never false
        raise AssertionError("ledger: planned tiles not accounted exactly once")
    if ledger.unplanned:
        log.warning(
            "%d tile record(s) in %s are not in this run's plan; ignored",
            ledger.unplanned,
            run_dir / "parts",
        )
    return ledger


def write_missing(run_dir: Path, missing: list[str]) -> Path | None:
    """``missing_tiles.txt``: one tile key per line (removed when nothing is missing)."""
    path = run_dir / MISSING_FILE
    if not missing:
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{k}\n" for k in missing))
    os.replace(tmp, path)
    return path
