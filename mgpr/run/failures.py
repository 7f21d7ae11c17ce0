"""Rank failures as one line: out of memory, dead or raising DataLoader workers, a full disk.

The file-system case is any OS, SQLite or GDAL error while results are written or merged (a
full disk, a quota, a vanished mount).

Each keeps every finished tile (a re-run resumes) and names the config key to lower or the
space to free.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from mgpr.conf.schema import PredictConfig
from mgpr.errors import MgprError, OutputError, ResourceError, WorkerFailedError
from mgpr.outputs.rundir import rerun

#: OS error numbers that mean the disk (or the user's quota on it) is full.
_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError`` and the allocators' plain RuntimeErrors."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _clipped(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: its start and its end, cut at words.

    The end of an error often says what happened (SQLite's "... database or disk is full"),
    so a long one keeps both ends around a ``...``, never a word cut in two.
    """
    if len(text) <= limit:
        return text
    words = text.split(" ")
    head: list[str] = []
    tail: list[str] = []
    budget = limit - 5  # " ... "
    while words and len(" ".join(head + words[:1])) <= budget * 0.6:
        head.append(words.pop(0))
    while words and len(" ".join(words[-1:] + tail)) <= budget - len(" ".join(head)):
        tail.insert(0, words.pop())
    if not head and not tail:
        return text[: limit - 3] + "..."
    return " ".join(head) + " ... " + " ".join(tail)


def out_of_memory_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, accelerator: str, rank: int
) -> MgprError:
    """One line naming ``batch_size`` and a smaller value; the parts published so far are kept."""
    first = _clipped(" ".join(str(exc).split()).split(". ")[0], 160)
    where = "the GPU" if accelerator == "gpu" else "the host"
    if cfg.batch_size > 1:
        fix = f"re-run with batch_size={cfg.batch_size // 2} to resume"
    else:
        fix = (
            f"batch_size is already 1: re-run with a smaller tile_size (now {cfg.tile_size}) "
            "and overwrite=true, or precision=16-mixed"
        )
    return ResourceError(
        f"out of memory on {where} (rank {rank}) with batch_size={cfg.batch_size} ({first}); "
        f"every finished tile is kept in {run_dir / 'parts'}; {fix}"
    )


def is_worker_death(exc: BaseException) -> bool:
    """True for the DataLoader's error when one of its worker processes died (signal, exit)."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "DataLoader worker" in text
        and ("exited unexpectedly" in text or "killed by signal" in text)
    )


def worker_death_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, rank: int
) -> MgprError:
    """One line: which worker died, the usual causes and how to resume with less memory."""
    first = _clipped(" ".join(str(exc).split()).split(". ")[0], 200)
    smaller = (
        f"workers={max(1, cfg.workers // 2)}"
        if cfg.workers > 1
        else f"batch_size={max(1, cfg.batch_size // 2)}"
    )
    return ResourceError(
        f"a DataLoader worker of rank {rank} died ({first}); the usual causes are too little "
        f"shared memory (/dev/shm) or host memory for workers={cfg.workers} x "
        f"batch_size={cfg.batch_size}; every finished tile is kept in {run_dir / 'parts'}; "
        f"re-run with {smaller} (or more memory) to resume"
    )


def is_worker_exception(exc: BaseException) -> bool:
    """True for an exception a DataLoader worker raised, re-raised by torch in the rank."""
    return "in DataLoader worker process" in str(exc).split("\n", 1)[0]


def worker_exception_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, rank: int
) -> MgprError:
    """One line: the worker's own exception (its last line), what is kept, how to see more."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    cause = " ".join(lines[-1].split())[:300] if lines else type(exc).__name__
    return WorkerFailedError(
        f"a DataLoader worker of rank {rank} failed: {cause}; every finished tile is kept in "
        f"{run_dir}; re-run with workers=0 to see the whole traceback (it resumes), and report "
        "it if it is not about your input"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def is_file_system_error(exc: BaseException) -> bool:
    """True for an OS, SQLite or GDAL (rasterio, pyogrio) error, never an MgprError.

    That is what writing parts, COGs, GeoPackage or GeoParquet raises when the disk is full,
    over quota or gone. Connection errors and timeouts (OSErrors too) are left out: they come
    from the process group's store when a rank dies, which other lines report.
    """
    import sqlite3

    from pyogrio.errors import DataLayerError, DataSourceError
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    kinds = (
        OSError,  # Python's and pyarrow's writes (ArrowIOError is one)
        sqlite3.Error,
        CPLE_BaseError,  # GDAL through rasterio: part GeoTIFFs, COG assembly
        RasterioError,
        DataLayerError,  # GDAL through pyogrio: the GeoPackage
        DataSourceError,
    )
    network = (ConnectionError, TimeoutError)
    chain = _chain(exc)
    if isinstance(exc, MgprError) or any(isinstance(e, network) for e in chain):
        return False
    return any(isinstance(e, kinds) for e in chain)


#: Free space under which a GDAL write error without the OS's reason is called a full disk.
LOW_FREE_BYTES = 256 * 2**20


def _free_bytes(path: Path) -> float:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent); inf if unknown."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return float(shutil.disk_usage(probe).free)
    except OSError:
        return float("inf")


def _free_mib(path: Path) -> str:
    free = _free_bytes(path)
    return "unknown" if free == float("inf") else f"{free / 2**20:,.0f} MiB"


def file_system_error(exc: BaseException, run_dir: Path, rank: int) -> MgprError:
    """One line: the error as the OS/GDAL/SQLite said it, the free space where mgpr writes.

    GDAL often reports a full disk as a failed block write without the OS's reason, so the
    line gives both disks' free space (the run directory, and ``$TMPDIR`` where the GeoPackage
    is built) rather than guessing; a plain ENOSPC/EDQUOT is named as a full disk.
    """
    chain = _chain(exc)
    first = _clipped(" ".join(str(chain[0]).split()), 220) or type(chain[0]).__name__
    full = any(getattr(e, "errno", None) in _FULL for e in chain) or any(
        marker in str(e)
        for e in chain
        for marker in ("No space left", "Disk quota", "disk is full", "quota exceeded")
    )
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    low = any(_free_bytes(p) < LOW_FREE_BYTES for p in (run_dir, tmp))
    what = (
        "the disk is full"
        if full
        else "a file-system error, probably a full disk"
        if low
        else "a file-system error"
    )
    fix = (
        "free space (or choose another output_dir / TMPDIR)"
        if full or low
        else "both disks have room, so check that they are mounted and writable (a bug in mgpr "
        f"if it repeats: report it with {run_dir / 'logs'})"
    )
    return OutputError(
        f"rank {rank} stopped on {what} ({type(chain[0]).__name__}: {first}); free space: "
        f"{_free_mib(run_dir)} in {run_dir}, {_free_mib(tmp)} in TMPDIR={tmp}; every finished "
        f"tile is kept in {run_dir / 'parts'}: {fix}, then {rerun(run_dir)}"
    )


def translate_failure(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, accelerator: str, rank: int
) -> MgprError | None:
    """The one-line error for a known failure of the predict loop, or None (a bug: traceback)."""
    if is_out_of_memory(exc):
        return out_of_memory_error(exc, cfg, run_dir, accelerator, rank)
    if is_worker_death(exc):
        return worker_death_error(exc, cfg, run_dir, rank)
    if is_worker_exception(exc):
        return worker_exception_error(exc, cfg, run_dir, rank)
    if is_file_system_error(exc):
        return file_system_error(exc, run_dir, rank)
    return None
