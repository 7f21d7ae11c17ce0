"""The inputs' headers read once per node when Lightning's launcher starts the other ranks.

``mgpr gpus=8`` on a workstation: rank 0 reads every input's header, then Lightning starts
ranks 1..7 as new processes that run the command from the top, each reading every header again
(a folder of 20,000 chips: ~15 s per rank with the header pool on 2 CPUs, all ranks competing
for the same CPUs). Rank 0 leaves its headers in the run directory
(:data:`HEADERS_FILE`) and names the file in the environment (:data:`HEADERS_ENV`), which the
processes Lightning launches inherit; a rank > 0 takes them when they are for the same run
directory and the same input list, else reads the headers itself. Ranks that ``srun`` starts
do not come here for them: rank 0 tells them its headers (:mod:`mgpr.run.rendezvous`).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgpr.geo.headers import PARALLEL_MIN_INPUTS, describe_rasters
from mgpr.geo.raster import RasterInfo

log = logging.getLogger(__name__)

#: The environment variable naming rank 0's headers file (inherited by launched ranks).
HEADERS_ENV = "MGPR_INPUT_HEADERS"
#: Rank 0's headers, in the run directory's ``logs/`` (removed once prediction ends).
HEADERS_FILE = "logs/input_headers.pkl"


def input_headers(paths: Sequence[str], run_dir: Path, rank: int) -> list[RasterInfo]:
    """Every input's :class:`RasterInfo`, in ``paths`` order: rank 0's when it left them.

    Rank 0 with at least :data:`~mgpr.geo.headers.PARALLEL_MIN_INPUTS` inputs saves its
    headers for the ranks Lightning launches (fewer cost less to read than to share).
    """
    paths = list(paths)
    if rank > 0:
        shared = _read_shared(paths, run_dir)
        if shared is not None:
            log.info("rank %d: the headers of %d inputs from rank 0", rank, len(shared))
            return shared
    found = describe_rasters(paths)
    if rank == 0 and len(paths) >= PARALLEL_MIN_INPUTS:
        _share(found, paths, run_dir)
    return found


def _share(found: list[RasterInfo], paths: list[str], run_dir: Path) -> None:
    """Write the headers (atomically) and name them in this process's environment."""
    target = run_dir / HEADERS_FILE
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    payload = {"run_dir": str(run_dir.resolve()), "paths": paths, "rasters": found}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as fh:
            pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, target)
    except OSError as exc:  # the other ranks read the headers themselves
        log.debug("input headers not shared: %s", exc)
        tmp.unlink(missing_ok=True)
        return
    os.environ[HEADERS_ENV] = str(target)


def _read_shared(paths: list[str], run_dir: Path) -> list[RasterInfo] | None:
    """Rank 0's headers when the environment names a file for this run and these inputs."""
    name = os.environ.get(HEADERS_ENV)
    if not name:
        return None
    try:
        with open(name, "rb") as fh:
            payload: Any = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("run_dir") != str(run_dir.resolve())
        or payload.get("paths") != paths
    ):
        return None
    rasters = payload.get("rasters")
    if not isinstance(rasters, list) or len(rasters) != len(paths):
        return None
    return rasters


def remove_shared_headers(run_dir: Path) -> None:
    """Rank 0, once prediction ended: the launched ranks have read the file (or never will)."""
    (run_dir / HEADERS_FILE).unlink(missing_ok=True)
    if os.environ.get(HEADERS_ENV) == str(run_dir / HEADERS_FILE):
        del os.environ[HEADERS_ENV]
