"""Datasets: a position in the run's list of tiles -> a sample.

The sampler picks the positions (:class:`mgpr.run.claims.ChunkClaimBatchSampler`: chunks of the
tiles left to predict, claimed by each rank as it goes); the datasets only map a position in
that list to a sample. A sample is a dict:

* ``image``: ``(C, tile_size, tile_size)`` tensor of the reader's carrier dtype (uint8 for
  8-bit rasters; uint16, int16, int32, int64 or float32 holding other rasters' values exactly),
  CPU (pinned by the DataLoader on GPU runs); never scaled on the CPU
  (:mod:`mgpr.data.scaling` does that on the device).
* ``index``: int64, the tile's position in the run's tile list (the same on every rank): the
  tile id travels inside the batch, so nothing relies on Lightning's ``batch_indices``.
* ``status``: int64, :data:`STATUS_OK`, :data:`STATUS_EMPTY` (all nodata: the model is not run)
  or :data:`STATUS_FAILED` (the read raised; ``reason`` says why and the run goes on).
* ``reason``: str, empty unless failed.
* ``mask`` (only for a tile that may have invalid pixels): ``(tile_size, tile_size)`` uint8
  validity, as in a batch (below).

A batch from :meth:`TileDataset.__getitems__` holds ``image`` (B, C, H, W), ``mask`` (below),
``index`` and ``status`` as int64 numpy arrays (B,) (each tensor would cost the main process a
file-descriptor hand-over per batch), ``reason`` (list of B str) and ``pool_slot`` (int, see
:mod:`mgpr.data.batch_pool`).

``mask`` is the tiles' validity mask, a (B, H, W) uint8 tensor (255 valid, 0 invalid: nodata,
internal/external mask, alpha, NaN, past the raster's edge; :meth:`TileReader.read_mask`) in the
same shared-memory slot as the images, or None when no tile of the batch can have an invalid
pixel (no raster of the batch has a nodata value, mask or alpha, and the carrier is not float:
the common 8-bit RGB case costs nothing) or when, read, every pixel of every tile to predict is
valid (the inside of a raster with a nodata border: no fill, drop or device copy). A tile of a
raster without a mask in a masked batch gets 255 over its valid window.

Samples stacked by ``default_collate`` give tensors instead; consumers read both through
``np.asarray``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mgpr.data.batch_pool import NO_SLOT, Part, SharedBatchPool, new_shared_parts
from mgpr.geo.raster import TileReader
from mgpr.geo.tiling import Tile
from mgpr.geo.values import real_values

log = logging.getLogger(__name__)

STATUS_OK = 0
STATUS_EMPTY = 1
STATUS_FAILED = 2


class TileDataset(Dataset[dict[str, Any]]):
    """Tiles of one rank, read through a per-worker :class:`TileReader`.

    Args:
        tiles: this rank's tiles (after sharding and resume).
        reader: reads windows; opens rasters lazily in each worker.
        check_mask_paths: rasters that may have invalid pixels (``RasterInfo.has_mask``): their
            tiles carry GDAL's validity mask, read first (an all-invalid tile is not decoded).
            With a float carrier every tile carries a mask, where NaN in any band is invalid.
        test_delay_s: TEST-ONLY extra sleep per read (non-empty) tile, seconds: simulates a
            slower rank for the balance tests (``MGPR_TEST_TILE_DELAY_RANK<r>``); 0 otherwise.
    """

    def __init__(
        self,
        tiles: Sequence[Tile],
        reader: TileReader,
        check_mask_paths: set[str],
        test_delay_s: float = 0.0,
    ) -> None:
        self.tiles = list(tiles)
        self.reader = reader
        self.check_mask_paths = set(check_mask_paths)
        self.test_delay_s = test_delay_s
        self.bands = {p: len(b) for p, b in reader.bands_by_path.items()}
        #: torch dtype of every sample (the reader's carrier)
        self.dtype = torch.from_numpy(np.empty(0, dtype=reader.carrier)).dtype
        #: NaN and +-inf are never valid values (a failed division, an unset reflectance): float
        #: tiles always carry a mask, those pixels invalid (inf was scaled to 0 or 1 and seen)
        self.nan_invalid = self.dtype.is_floating_point
        #: set by :class:`mgpr.data.batch_pool.TileLoader` before its workers fork
        self.batch_pool: SharedBatchPool | None = None
        #: ranks on this node, whose loaders share /dev/shm (the TileLoader's check)
        self.ranks_per_node = 1
        #: read failures seen by this process (each worker has its own copy)
        self.read_failures = 0

    def __len__(self) -> int:
        return len(self.tiles)

    def shape_keys(self) -> list[int]:
        """Per index, what a batch must share: the tile's band count (see data/batching.py)."""
        return [self.bands[t.id.path] for t in self.tiles]

    def sample_bytes(self) -> int:
        """Bytes of the largest tile (most bands, carrier itemsize, + 1 per pixel for a mask).

        What sizes the shared-memory need (:func:`~mgpr.data.batch_pool.shared_memory_need`).
        """
        pixels = self.reader.tile_size**2
        image = max(self.bands.values(), default=0) * pixels * self.dtype.itemsize
        return image + (pixels if self.nan_invalid or self.check_mask_paths else 0)

    def _masked(self, index: int) -> bool:
        """Whether tile ``index`` may have invalid pixels, so its batch carries a mask."""
        return self.nan_invalid or self.tiles[index].id.path in self.check_mask_paths

    def __getitem__(self, index: int) -> dict[str, Any]:
        tile = self.tiles[index]
        size = self.reader.tile_size
        image = torch.empty((self.bands[tile.id.path], size, size), dtype=self.dtype)
        mask = torch.empty((size, size), dtype=torch.uint8) if self._masked(index) else None
        status, reason = self._fill(index, image.numpy(), None if mask is None else mask.numpy())
        sample = _sample(image, index, status, reason)
        if mask is not None:
            sample["mask"] = mask
        return sample

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A whole batch, each tile decoded straight into one ``(B, C, H, W)`` carrier tensor.

        The DataLoader's fetcher calls this instead of ``__getitem__`` per index. Inside a
        worker the batch lives in shared memory from the start, so neither ``torch.stack`` in
        the collate nor the hand-over to the main process copies the pixels (they are decoded
        once, into their final place); with a :class:`~mgpr.data.batch_pool.SharedBatchPool` the
        shared buffer is one the main process has finished with, pages already mapped. Returns a
        :class:`TileBatch`: a list of samples (views into the batch, so any collate works)
        carrying the batch, which :func:`collate_tiles` passes through uncopied. Batches of
        tiles with differing band counts cannot be one tensor: the loader never makes them
        (:class:`~mgpr.data.batching.UniformShapeBatchSampler`); given one, this raises.
        """
        size = self.reader.tile_size
        counts = {self.bands[self.tiles[i].id.path] for i in indices}
        if len(counts) != 1:
            raise ValueError(
                f"a batch mixes tiles with {sorted(counts)} bands; batch them with "
                "UniformShapeBatchSampler (mgpr.data.batching)"
            )
        parts: list[Part] = [((len(indices), counts.pop(), size, size), self.dtype)]
        if any(self._masked(i) for i in indices):
            parts.append(((len(indices), size, size), torch.uint8))
        worker = torch.utils.data.get_worker_info()
        slot = NO_SLOT
        if worker is not None and self.batch_pool is not None:
            tensors, slot = self.batch_pool.acquire_parts(worker.id, parts)
        elif worker is not None:
            tensors = new_shared_parts(parts)
        else:
            tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in parts]
        images = tensors[0]
        masks = tensors[1] if len(tensors) > 1 else None
        array = images.numpy()
        mask_array = None if masks is None else masks.numpy()
        status = np.empty(len(indices), dtype=np.int64)
        reasons = []
        for pos, index in enumerate(indices):
            st, reason = self._fill(
                index, array[pos], None if mask_array is None else mask_array[pos]
            )
            status[pos] = st
            reasons.append(reason)
        if mask_array is not None and all(
            mask_array[pos].all() for pos in np.flatnonzero(status == STATUS_OK).tolist()
        ):
            masks = None  # every pixel the model will see is valid: no fill, no drop, no copy
        batch = {
            "image": images,
            "mask": masks,
            "index": np.asarray(indices, dtype=np.int64),
            "status": status,
            "reason": reasons,
            "pool_slot": slot,
        }
        return TileBatch(batch)

    def _warn_read_failure(self, tile: Tile, reason: str) -> None:
        """One warning per failed tile for the first :data:`READ_FAILURES_LOGGED`, then one line."""
        self.read_failures += 1
        if self.read_failures <= READ_FAILURES_LOGGED:
            log.warning("tile %s failed to read: %s", tile.id.key(), reason)
        if self.read_failures == READ_FAILURES_LOGGED:
            log.warning(
                "%d tiles failed to read in this loader process; further failures are not "
                "logged one by one: failed_tiles.csv and the summary list every one",
                READ_FAILURES_LOGGED,
            )

    def _fill(self, index: int, out: np.ndarray, mask: np.ndarray | None) -> tuple[int, str]:
        """Decode tile ``index`` into ``out`` and its validity into ``mask``; (status, reason).

        :meth:`TileReader.read_masked` for a raster with invalid pixels: a tile with none valid
        is :data:`STATUS_EMPTY` (its image zeros; not decoded where the mask is a band of its
        own). ``mask`` None: the batch carries none (its tiles are all valid). Failed tiles are
        zeros (image and mask).
        """
        tile = self.tiles[index]
        try:
            if mask is not None and tile.id.path in self.check_mask_paths:
                if not self.reader.read_masked(tile, out, mask):
                    return STATUS_EMPTY, ""
            else:
                self.reader.read(tile, out=out)
                if mask is not None:  # valid inside the raster, invalid past its edge
                    mask[...] = 0
                    mask[: tile.valid_height, : tile.valid_width] = 255
            if mask is not None and self.nan_invalid:  # NaN, +-inf, +-3.4028235e38
                mask[~real_values(out, axis=0)] = 0
                if not mask.any():
                    return STATUS_EMPTY, ""
            if self.test_delay_s > 0:
                time.sleep(self.test_delay_s)
            return STATUS_OK, ""
        except Exception as exc:  # a corrupt block costs this tile only; recorded as failed
            reason = _read_failure_reason(exc)
            self._warn_read_failure(tile, reason)
            out[...] = 0
            if mask is not None:
                mask[...] = 0
            return STATUS_FAILED, reason[:500]


#: Read failures one process (a DataLoader worker, or the rank with workers=0) logs one by one;
#: past them a corrupt raster would print a line per tile (thousands): they are counted in
#: failed_tiles.csv and the summary instead.
READ_FAILURES_LOGGED = 10


class FakeTileDataset(Dataset[dict[str, Any]]):
    """Random uint8 tiles that take ``delay_s`` each: tests the environment, not a raster.

    The original demo's ``use_fake_data``: with the delay dominant, throughput scales with the
    number of ranks, which checks that every rank really works on its own share.
    """

    def __init__(self, count: int, tile_size: int, bands: int, delay_s: float, seed: int) -> None:
        self.count = count
        self.tile_size = tile_size
        self.bands = bands
        self.delay_s = delay_s
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        rng = np.random.default_rng((self.seed, index))
        image = rng.integers(0, 256, (self.bands, self.tile_size, self.tile_size), dtype=np.uint8)
        return _sample(torch.from_numpy(image), index, STATUS_OK, "")


def _read_failure_reason(exc: BaseException) -> str:
    """One line for a failed read: rasterio's own message plus GDAL's cause, when chained.

    rasterio raises ``RasterioIOError("Read failed. See previous exception for details.")``
    from GDAL's error (``IReadBlock failed at X offset 2, Y offset 1: ...``); the cause is the
    useful part, so it is appended.
    """

    def first_line(err: BaseException) -> str:
        text = str(err).strip()
        return text.splitlines()[0] if text else ""

    reason = f"{type(exc).__name__}: {first_line(exc)}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and first_line(cause) and first_line(cause) not in reason:
        reason += f" ({first_line(cause)})"
    return reason


class TileBatch(list[dict[str, Any]]):
    """The samples of one batch as views into ``batch`` (the collated dict, already built)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        super().__init__(
            _sample(image, int(index), int(status), reason)
            for image, index, status, reason in zip(
                batch["image"], batch["index"], batch["status"], batch["reason"], strict=True
            )
        )
        self.batch = batch


def collate_tiles(data: list[dict[str, Any]]) -> dict[str, Any]:
    """The DataLoader's ``collate_fn``: a :class:`TileBatch`'s batch passes through uncopied.

    Any other list of samples (fake data, mixed band counts) is stacked by default_collate.
    """
    if isinstance(data, TileBatch):
        return data.batch
    return default_collate(data)  # type: ignore[no-any-return]


def _sample(image: torch.Tensor, index: int, status: int, reason: str) -> dict[str, Any]:
    return {
        "image": image,
        "index": torch.tensor(index, dtype=torch.int64),
        "status": torch.tensor(status, dtype=torch.int64),
        "reason": reason,
    }
