"""Every input's header before a run: :func:`describe_rasters`, in parallel for many inputs.

A folder of image chips (100,000 files of 256 px is a common training or inference set) pays one
GDAL open per file before any tile is read: ~1 ms each on a local disk, more on a parallel
filesystem, all on rank 0 while every other rank waits. GDAL's open holds the GIL, so threads
do not help (2 to 8 threads measured 0.72 to 0.91x of serial); processes do. With at least
:data:`PARALLEL_MIN_INPUTS` inputs the headers are read by a pool of forked processes, one per
CPU this process may run on (its affinity: what ``--cpus-per-task`` binds), each taking
:data:`CHUNK` files at a time. The result is the serial one: the same :class:`RasterInfo`, in
input order, and the first unreadable input (in input order) raises its own
:class:`~mgpr.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from mgpr.geo.raster import RasterInfo, describe_raster

log = logging.getLogger(__name__)

#: Fewer inputs than this are described in this process (a pool's start-up, ~10-50 ms, would
#: be a large share of their ~1 ms each).
PARALLEL_MIN_INPUTS = 256
#: Files one pool task describes: large enough that its pickling is noise, small enough that a
#: stop signal cancels the rest within a fraction of a second.
CHUNK = 64


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (what --cpus-per-task binds), not the node's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_processes(n_inputs: int, cpus: int | None = None) -> int:
    """Processes :func:`describe_rasters` uses for ``n_inputs`` (1: this process alone).

    One per usable CPU (``cpus``; default :func:`usable_cpus`), never more than the chunks of
    work there are; 1 below :data:`PARALLEL_MIN_INPUTS` inputs or off Linux (the pool forks).
    """
    if n_inputs < PARALLEL_MIN_INPUTS or not sys.platform.startswith("linux"):
        return 1
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(cpus, -(-n_inputs // CHUNK)))


def _leave_stop_signals_to_parent() -> None:
    """Pool processes ignore SIGTERM/SIGUSR1/SIGINT: the rank's own process handles the stop.

    ``scancel`` and Ctrl-C signal every process of the step or group; a forked process would
    otherwise run the rank's handler (which raises the clean stop) in the middle of a task.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _describe_chunk(paths: Sequence[str]) -> list[RasterInfo]:
    return [describe_raster(path) for path in paths]


def describe_rasters(paths: Sequence[str], processes: int | None = None) -> list[RasterInfo]:
    """Each input's :class:`RasterInfo` (:func:`describe_raster`), in the order of ``paths``.

    Args:
        paths: the run's inputs (files or GDAL paths), resolved.
        processes: header-reading processes; None: :func:`describe_processes`. 1 reads here.

    Raises:
        InputError: the first input (in ``paths`` order) that is not a readable raster.
    """
    paths = list(paths)
    n = describe_processes(len(paths)) if processes is None else max(1, processes)
    if n == 1 or len(paths) < 2:
        return _one_text_per_crs([describe_raster(path) for path in paths])
    return _one_text_per_crs(_in_processes(paths, n))


def _one_text_per_crs(found: list[RasterInfo]) -> list[RasterInfo]:
    """The rasters with one shared string per distinct CRS text.

    A CRS's WKT is ~600 B, more than half a header: 100,000 chips in one CRS would otherwise
    hold (and pickle, to the other ranks) 100,000 copies of it.
    """
    seen: dict[str, str] = {}
    out = []
    for info in found:
        wkt = info.crs_wkt
        if wkt is not None and seen.setdefault(wkt, wkt) is not wkt:
            info = dataclasses.replace(info, crs_wkt=seen[wkt])
        out.append(info)
    return out


def _in_processes(paths: list[str], n: int) -> list[RasterInfo]:
    """:func:`describe_rasters` by ``n`` forked processes, :data:`CHUNK` inputs per task."""
    log.info("reading the headers of %d inputs with %d processes", len(paths), n)
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    try:
        pool = ProcessPoolExecutor(
            max_workers=n,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_leave_stop_signals_to_parent,
        )
        try:
            return [info for chunk in pool.map(_describe_chunk, chunks) for info in chunk]
        finally:
            # A stop signal or an unreadable input: the chunks not started are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
    except (OSError, BrokenProcessPool) as exc:  # no processes to be had, or one was killed
        log.warning("header processes failed (%s); reading the headers here", exc)
        return [describe_raster(path) for path in paths]
