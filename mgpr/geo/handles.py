"""Open raster handles of one process: opened lazily, re-opened after a fork, bounded in number.

A :class:`~mgpr.geo.raster.TileReader` reads thousands of tiles from the same few files, so it
keeps their rasterio datasets open. Three rules:

- per process: a reader copied into a forked DataLoader worker must not share the parent's GDAL
  handles (GDAL datasets are not fork-safe), so the cache notices a new pid and starts empty;
  pickling (``spawn`` workers) drops the handles;
- one GDAL environment per process, with a block cache large enough that blocks shared by
  overlapping tiles are decoded once;
- at most :data:`MAX_OPEN_RASTERS` handles, the least recently used closed first: a run over
  thousands of small rasters (a tiled national orthophoto) otherwise held one open file per
  input in every worker and failed with "Too many open files" under a 1024-descriptor limit
  (reproduced: 1,500 inputs under ``ulimit -n 512``). Tiles arrive raster by raster, so the bound
  costs almost no re-opens.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import rasterio

#: Raster handles kept open per process (least recently used closed beyond it).
MAX_OPEN_RASTERS = 64
#: GDAL block cache of a reading process, bytes.
READ_CACHE_BYTES = 256 * 1024 * 1024


@contextlib.contextmanager
def no_georef_warning() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning: mgpr logs its own line once per raster.

    A raster without CRS is allowed (results in pixel coordinates, listed in summary.json
    ``pixel_coordinates``); without this, every open (header, each worker) would repeat it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        yield


class RasterHandles:
    """The open datasets of this process, by path (see the module docstring)."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()
        self._env: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Not empty: pickle skips __setstate__ for a false state, leaving no attributes.
        return {"handles": "not pickled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def get(self, path: str) -> Any:
        """The open dataset of ``path``, opening it (and closing the oldest) when needed."""
        if self._pid != os.getpid():  # a forked copy: the parent's handles are not ours
            self._open = OrderedDict()
            self._env = None
            self._pid = os.getpid()
        handle = self._open.get(path)
        if handle is not None:
            self._open.move_to_end(path)
            return handle
        while len(self._open) >= MAX_OPEN_RASTERS:
            self._open.popitem(last=False)[1].close()
        if self._env is None:
            self._env = rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)
            self._env.__enter__()
        with no_georef_warning():
            handle = rasterio.open(path)
        self._open[path] = handle
        return handle

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close every handle this process opened."""
        for handle in self._open.values():
            handle.close()
        self._open = OrderedDict()
