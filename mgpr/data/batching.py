"""Batches that never mix tile shapes.

A batch is one ``(B, C, H, W)`` tensor, so its tiles must share their band count (and sample
dtype). A run over rasters with different band counts (an RGB, an RGBA and a one-band raster with
a band-agnostic model) used to put tiles of two rasters in one batch at each raster boundary:
the collate failed inside a DataLoader worker. :class:`UniformShapeBatchSampler` cuts a batch
wherever the shape key changes, so every batch is uniform and plan order is kept (neighbouring
tiles of one raster stay together, sharing GDAL's block cache).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

from torch.utils.data import Sampler


class UniformShapeBatchSampler(Sampler[list[int]]):
    """Consecutive indexes in batches of up to ``batch_size``, cut where ``keys`` changes.

    Args:
        keys: one hashable per dataset index (e.g. the tile's band count); indexes with equal
            consecutive keys may share a batch.
        batch_size: most indexes per batch (>= 1).
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.keys = list(keys)
        self.batch_size = batch_size
        self._batches = self._plan()

    def _plan(self) -> list[list[int]]:
        return list(uniform_batches(self.keys, 0, len(self.keys), self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self._batches])

    def __len__(self) -> int:
        return len(self._batches)


def uniform_batches(
    keys: Sequence[Hashable] | None, start: int, stop: int, batch_size: int
) -> Iterator[list[int]]:
    """Indexes ``start..stop-1`` in order, in batches of up to ``batch_size``.

    A batch is also cut wherever ``keys`` changes (None: no keys, only the size cuts).
    """
    current: list[int] = []
    for index in range(start, stop):
        if current and (
            len(current) == batch_size or (keys is not None and keys[current[0]] != keys[index])
        ):
            yield current
            current = []
        current.append(index)
    if current:
        yield current
