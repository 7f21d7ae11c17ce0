"""Reusable shared-memory batch buffers for DataLoader workers, released by the main process.

Why: a DataLoader worker hands a batch to the rank's main process through shared memory. A fresh
segment per batch costs, per 1024 px RGB tile, about 1.3 CPU-ms in the workers (zero-filled
pages faulted in while decoding) and 0.2 ms in the main process (map, unmap): ~10 % of the data
path on top of the ~10.5 ms that decoding the DEFLATE blocks itself takes (measured on a 2-core
EPYC, ``benchmarks/pipeline.py``). Decoding into buffers whose pages are already mapped removes
that cost.

Safety rule: a worker writes into a slot only while the slot's flag is 0; it sets the flag to 1
before the batch leaves. Only the main process clears a flag, and only once no tensor in it
refers to that slot's memory any more (a weak reference to the storage has expired: views and
slices keep it alive, so a batch that is held, sliced or queued is never overwritten). When no
slot of the worker is free the batch goes into a fresh segment as before: the pool can make a
batch cheaper, never wait and never block a worker.

The main process also keeps its own mapping of each slot (a strong reference to the storage it
rebuilt): when the worker sends that segment again, torch's sharing cache hands back the same,
already mapped storage instead of mapping it anew and faulting every page in on first read
(for a batch of eight 512 px RGB tiles ~1,500 page faults). A slot is then free when that
reference is the storage's only one (``use_count == 1``: no tensor, view or queued batch uses
it). Batches that arrive pinned (``pin_memory``) are copies: their slot is freed when the copy's
storage is gone. GPU runs instead register each slot's mapping as pinned memory once
(:mod:`mgpr.data.pinned`) and load with ``pin_memory=False``: the batch itself is pinned.

One pool per iteration of :class:`TileLoader` (workers are forked for each iteration, so flags
left over from an earlier one can never release a slot of the new workers).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader

from mgpr.data.pinned import HostRegistrar, PinnedSlots

log = logging.getLogger(__name__)

SHM_PATH = "/dev/shm"
"""Where Linux keeps shared memory (a tmpfs; Docker's default is only 64 MiB)."""

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""References to a storage (tensors, views, storage objects); None where torch lacks it (the main
process then maps each batch anew, as without the pool)."""

PREFETCH_FACTOR = 4
"""Batches each DataLoader worker keeps ready (``DataLoader(prefetch_factor=...)`` of mgpr's)."""

EXTRA_SLOTS = 3
"""Buffers per worker beyond ``prefetch_factor``: the batch being filled, the one the main process
works on and the one Lightning fetches ahead."""

NO_SLOT = -1
"""``batch["pool_slot"]`` of a batch in a fresh (unpooled) segment or made without workers."""


def new_shared_bytes(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of ``nbytes`` in a new shared-memory segment.

    What a worker would send anyway; view it as the sample dtype with :func:`as_dtype`.
    """
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).new(storage)


def as_dtype(buffer: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The first ``prod(shape) * itemsize`` bytes of a flat uint8 ``buffer`` as ``dtype``, shaped.

    The buffer starts a segment (page-aligned), so the view is aligned for any dtype.
    """
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    return buffer[:nbytes].view(dtype).view(shape)


def new_shared(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` in a new shared-memory segment, sized by itemsize."""
    return new_shared_parts([(shape, dtype)])[0]


PART_ALIGN = 64
"""Byte alignment of each part of a slot after the first (any dtype, a cache line)."""

Part = tuple[tuple[int, ...], torch.dtype]
"""One tensor of a batch that shares a slot: (shape, dtype), e.g. the images then the masks."""


def parts_layout(parts: Sequence[Part]) -> tuple[list[int], int]:
    """Byte offset of each part in one buffer (each aligned to :data:`PART_ALIGN`), total bytes."""
    offsets = []
    end = 0
    for shape, dtype in parts:
        start = -(-end // PART_ALIGN) * PART_ALIGN
        offsets.append(start)
        numel = 1
        for n in shape:
            numel *= n
        end = start + numel * dtype.itemsize
    return offsets, end


def part_views(buffer: torch.Tensor, parts: Sequence[Part]) -> list[torch.Tensor]:
    """Each part as a tensor view into the flat uint8 ``buffer`` (:func:`parts_layout`).

    Views of one storage: a tensor of any part keeps the whole buffer (its slot) in use.
    """
    offsets, _ = parts_layout(parts)
    return [
        as_dtype(buffer[off:], shape, dtype)
        for off, (shape, dtype) in zip(offsets, parts, strict=True)
    ]


def new_shared_parts(parts: Sequence[Part]) -> list[torch.Tensor]:
    """The ``parts`` as views into ONE new shared-memory segment (one hand-over, one mapping)."""
    return part_views(new_shared_bytes(max(1, parts_layout(parts)[1])), parts)


class SharedBatchPool:
    """``slots_per_worker`` reusable buffers per worker and their in-use flags.

    Created in the main process before the workers fork (the flags live in shared memory and are
    inherited); each worker allocates its own slots' buffers lazily, in its own process.

    Args:
        workers: DataLoader worker processes.
        slots_per_worker: buffers each worker may keep; the worker's ``prefetch_factor`` batches
            in flight plus those the main process still holds (Lightning keeps one batch ahead).
        registrar: pins each slot's mapping in the main process once (GPU runs); None = not.
    """

    def __init__(
        self, workers: int, slots_per_worker: int, registrar: HostRegistrar | None = None
    ) -> None:
        if workers < 1 or slots_per_worker < 1:
            raise ValueError(f"need workers >= 1 and slots >= 1, got {workers}, {slots_per_worker}")
        self.workers = workers
        self.slots_per_worker = slots_per_worker
        self.in_use = torch.zeros(workers * slots_per_worker, dtype=torch.uint8).share_memory_()
        # Per worker: [batches from a pooled slot, batches in a fresh segment]; for tests and
        # benchmarks (is reuse happening?), written by workers, read by the main process.
        self.counts = torch.zeros((workers, 2), dtype=torch.int64).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # worker side: slot -> flat byte buffer
        self._pending: list[tuple[int, StorageWeakRef]] = []  # main side: slots handed out
        self._mapped: dict[int, torch.UntypedStorage] = {}  # main side: slot -> its mapping
        self._pending_mapped: list[int] = []  # main side: mapped slots handed out
        self.pinned = PinnedSlots(registrar) if registrar is not None else None  # main side

    def __getstate__(self) -> dict[str, Any]:
        """Spawned workers get the shared flags and counters, not buffers or main-side state."""
        state = self.__dict__.copy()
        state["_buffers"] = {}
        state["_pending"] = []
        state["_mapped"] = {}
        state["_pending_mapped"] = []
        state["pinned"] = None
        return state

    # ---------------------------------------------------------------- worker side
    def acquire(
        self, worker_id: int, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8
    ) -> tuple[torch.Tensor, int]:
        """A ``dtype`` tensor of ``shape`` in shared memory and its slot (:data:`NO_SLOT`: fresh).

        Slots are byte buffers, sized by ``numel * dtype.itemsize``: a uint16 batch takes twice
        the bytes of a uint8 one of the same shape. Call from worker ``worker_id`` only; the
        tensor's contents are undefined.
        """
        tensors, slot = self.acquire_parts(worker_id, [(shape, dtype)])
        return tensors[0], slot

    def acquire_parts(
        self, worker_id: int, parts: Sequence[Part]
    ) -> tuple[list[torch.Tensor], int]:
        """Tensors for ``parts`` in ONE slot (e.g. images + their validity masks), and the slot.

        The parts are views of the slot's buffer (:func:`part_views`), so the main process sees
        the batch in use while any of them lives, and a GPU run's pinned registration covers
        them all. :data:`NO_SLOT`: a fresh segment holds them.
        """
        _, nbytes = parts_layout(parts)
        first = worker_id * self.slots_per_worker
        for slot in range(first, first + self.slots_per_worker):
            if int(self.in_use[slot]) != 0:
                continue
            buffer = self._buffers.get(slot)
            if buffer is None or buffer.numel() < nbytes:
                buffer = new_shared_bytes(nbytes)
                self._buffers[slot] = buffer
            self.in_use[slot] = 1
            self.counts[worker_id, 0] += 1
            return part_views(buffer, parts), slot
        self.counts[worker_id, 1] += 1
        return new_shared_parts(parts), NO_SLOT

    # ---------------------------------------------------------------- main side
    def track(self, batch: Any) -> None:
        """Note a batch the main process received; free slots whose batches are gone.

        A slot is freed only when no tensor in this process uses its memory. With
        ``pin_memory`` the batch seen here is the pinned copy, which outlives the shared one:
        the slot is then freed a little later than it could be, never earlier.
        """
        if isinstance(batch, dict):
            slot = batch.get("pool_slot", NO_SLOT)
            image = batch.get("image")
            if isinstance(slot, int) and slot != NO_SLOT and isinstance(image, torch.Tensor):
                storage = image.untyped_storage()
                if _storage_use_count is not None and storage.is_shared():
                    known = self._mapped.get(slot)
                    if known is None or known.data_ptr() != storage.data_ptr():
                        if self.pinned is not None:  # unpins the old range while still mapped
                            self.pinned.ensure(slot, storage.data_ptr(), storage.nbytes())
                        self._mapped[slot] = storage  # a new or regrown segment for this slot
                    self._pending_mapped.append(slot)
                else:
                    self._pending.append((slot, StorageWeakRef(storage)))
                del storage, image
        self.release_expired()

    def release_expired(self) -> None:
        """Clear the flag of every handed-out slot whose memory no tensor uses any more."""
        keep = []
        for slot, ref in self._pending:
            if ref.expired():
                self.in_use[slot] = 0
            else:
                keep.append((slot, ref))
        self._pending = keep
        if self._pending_mapped:
            assert _storage_use_count is not None
            busy = []
            for slot in self._pending_mapped:
                if _storage_use_count(self._mapped[slot]._cdata) <= 1:  # only our reference
                    self.in_use[slot] = 0
                else:
                    busy.append(slot)
            self._pending_mapped = busy

    def forget_mappings(self) -> None:
        """Drop this process's references to the slots (after the last batch).

        The shared memory is returned once the batches still held elsewhere are gone too; pinned
        ranges are unregistered first (the caller has read every batch's results back).
        """
        if self.pinned is not None:
            self.pinned.release_all()
        self._mapped = {}
        self._pending_mapped = []
        self._pending = []

    def reuse_counts(self) -> tuple[int, int]:
        """(batches decoded into a reused-or-pooled slot, batches in a fresh segment)."""
        pooled, fresh = self.counts.sum(dim=0).tolist()
        return int(pooled), int(fresh)


def shared_memory_need(
    workers: int, batch_size: int, sample_bytes: int, prefetch_factor: int = PREFETCH_FACTOR
) -> int:
    """Bytes of shared memory a rank's pool may hold at most: every slot of every worker full.

    Args:
        workers: DataLoader workers of the rank.
        batch_size: tiles per batch.
        sample_bytes: bytes of one tile, ``bands * tile_size**2 * itemsize`` of the carrier
            (plus ``tile_size**2``, its validity mask, for rasters with nodata, a mask or alpha).
        prefetch_factor: batches each worker keeps ready.
    """
    return workers * (prefetch_factor + EXTRA_SLOTS) * batch_size * sample_bytes


def batch_beyond_memory(
    batch_size: int,
    bands: int,
    tile_size: int,
    itemsize: int,
    memory_bytes: int | None,
    largest_input: tuple[int, int] | None = None,
    memory_source: str = "node",
) -> str | None:
    """One line when ONE batch of tiles cannot fit in this machine's memory, else None.

    A lower bound, so it never refuses a run that could work: whatever the workers, a batch of
    tiles is in host memory at least once (shared memory is RAM too), before the model's
    float32 copy and activations. ``tile_size=100000`` (a typo, or "one tile for the whole
    raster") otherwise dies at the first batch with an out-of-memory error that suggests
    halving ``batch_size``, which cannot help.

    Args:
        batch_size: tiles per batch.
        bands: bands read per tile (the most of any input).
        tile_size: tile side, model pixels.
        itemsize: bytes per value of the carrier dtype (:func:`~mgpr.geo.values.carrier_dtype`).
        memory_bytes: the memory this process may use (None: unknown, nothing said): the
            node's physical memory, or a cgroup's limit below it
            (:func:`~mgpr.monitor.part.host_memory_limit`).
        largest_input: (height, width) of the largest input, model pixels, for the fix.
        memory_source: ``node`` or ``cgroup`` (``sbatch --mem``, a container's limit): what
            ``memory_bytes`` is, named in the line.
    """
    need = batch_size * bands * tile_size * tile_size * itemsize
    if memory_bytes is None or need <= memory_bytes:
        return None
    sizes = ""
    if largest_input is not None:
        sizes = f" (the largest input is {largest_input[1]} x {largest_input[0]} px)"
    fix = f"lower tile_size{sizes}" + (" or batch_size" if batch_size > 1 else "")
    return (
        f"tile_size={tile_size} with batch_size={batch_size} needs {_size(need)} of host memory "
        f"for one batch of tiles alone ({batch_size} x {bands} band(s) x {tile_size}^2 px x "
        f"{itemsize} B), more than {_memory_name(memory_bytes, memory_source)}; {fix}"
    )


def _memory_name(memory_bytes: int, source: str) -> str:
    """What the batch does not fit into, in words."""
    if source == "cgroup":
        return (
            f"the {_size(memory_bytes)} this job may use (its cgroup memory limit: sbatch --mem "
            "or the container's)"
        )
    return f"this machine's {_size(memory_bytes)}"


def _size(nbytes: int) -> str:
    """``74.5 GiB`` / ``6.0 MiB``: bytes in the unit that shows them."""
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def shared_memory_free(path: str = SHM_PATH) -> int | None:
    """Free bytes in the shared-memory filesystem; None where there is none (not Linux)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def shared_memory_shortfall(need_bytes: int, path: str = SHM_PATH, ranks: int = 1) -> str | None:
    """One line when ``need_bytes`` of batches may not fit in the free shared memory, else None.

    A worker that runs out of shared memory dies of SIGBUS mid-batch ("DataLoader worker ...
    killed by signal: Bus error"); saying so before the run starts names the fix instead.
    ``need_bytes`` is the node's: ``ranks`` (ranks on the node) x one rank's need.
    """
    free = shared_memory_free(path)
    if free is None or need_bytes <= free:
        return None
    gib = 2**30
    who = f" ({ranks} ranks on this node)" if ranks > 1 else ""
    return (
        f"DataLoader batches may need up to {need_bytes / gib:.2f} GiB of shared memory{who} but "
        f"{path} has {free / gib:.2f} GiB free; lower batch_size or workers, or give the "
        "job/container more (e.g. docker run --shm-size=8g)"
    )


class _TrackingIterator:
    """Passes batches through, letting the pool see each one (holds no batch itself)."""

    def __init__(self, inner: Iterator[Any], pool: SharedBatchPool) -> None:
        self.inner = inner
        self.pool = pool

    def __iter__(self) -> _TrackingIterator:
        return self

    def __next__(self) -> Any:
        self.pool.release_expired()  # the previous batch may be gone by now
        try:
            batch = next(self.inner)
        except StopIteration:
            self.pool.forget_mappings()  # the workers are gone: unmap the slots
            raise
        self.pool.track(batch)
        return batch

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TileLoader(DataLoader[Any]):
    """A DataLoader whose workers decode into a :class:`SharedBatchPool` (see module doc).

    Same constructor as ``DataLoader`` (so Lightning can re-create it with its own batch
    sampler). The pool is used when the dataset has a ``batch_pool`` attribute (e.g.
    :class:`mgpr.data.dataset.TileDataset`) and there are workers; otherwise it is a plain
    DataLoader.

    Args:
        host_registrar: pins the pool's buffers (GPU runs, with ``pin_memory=False``); a
            constructor argument and attribute so Lightning's re-instantiation keeps it.

    Attributes:
        iter_started_s: ``time.monotonic()`` seconds when the last iterator was created, or
            None before the first. Lightning's prefetching fetcher creates it and fetches the
            first batch BEFORE ``on_predict_start``; the run monitor starts its clock here so
            worker start-up and the first batch count as data wait
            (:mod:`mgpr.monitor.callback`).
    """

    def __init__(self, *args: Any, host_registrar: HostRegistrar | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.host_registrar = host_registrar
        self.iter_started_s: float | None = None

    def __iter__(self) -> Any:
        self.iter_started_s = time.monotonic()
        dataset = self.dataset
        if self.num_workers == 0 or not hasattr(dataset, "batch_pool"):
            return super().__iter__()
        pool = getattr(self, "batch_pool", None)
        if pool is None or not self.persistent_workers:  # persistent workers keep their pool
            prefetch = self.prefetch_factor or 2
            pool = SharedBatchPool(self.num_workers, prefetch + EXTRA_SLOTS, self.host_registrar)
            dataset.batch_pool = pool  # set before the workers fork (in super().__iter__())
            self.batch_pool = pool
            sample_bytes = getattr(dataset, "sample_bytes", None)
            # With a batch sampler (uniform-shape batches) the DataLoader's batch_size is None.
            batch_size = self.batch_size or getattr(self.batch_sampler, "batch_size", None)
            if callable(sample_bytes) and batch_size:
                # Every rank of the node has such a pool, all in the same /dev/shm.
                ranks = int(getattr(dataset, "ranks_per_node", 1))
                need = ranks * shared_memory_need(
                    self.num_workers, batch_size, sample_bytes(), prefetch
                )
                warning = shared_memory_shortfall(need, ranks=ranks)
                if warning:
                    log.warning(warning)
        return _TrackingIterator(super().__iter__(), pool)
