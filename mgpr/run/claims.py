"""Which tiles a rank predicts: small chunks of the plan claimed from a shared counter.

Why: equal static slices of the plan leave ranks idle. Orthomosaics have their nodata clustered
(a collar, whole empty rows), a resumed run has some slices mostly done, and GPUs differ in speed,
so a rank whose slice is cheap finishes minutes before the others. Here every rank instead takes
the next :data:`CHUNK_BATCHES` batches of the run's *remaining* tiles whenever it needs more
work, by incrementing one counter in the process group's store (``TCPStore.add`` is atomic on the
store's server, rank 0). A cheap chunk (empty tiles) is over quickly and its rank simply claims
another, so ranks finish within about one chunk plus the DataLoader's prefetch of each other,
whatever the distribution of nodata, finished tiles or rank speed.

A chunk claimed by a rank that dies is not done: it is in no published part, so a resume
predicts it (nothing is reassigned during the run, which keeps the accounting simple).

Every rank must agree on the list the chunk numbers index: rank 0 DECIDES which tiles of the plan
are left (it reads the done set once, after the process group exists) and publishes that decision
in the store; the others are TOLD (:func:`share_remaining`), instead of each reading the run
directory on a shared filesystem that may show them different states.

Claims happen in the rank's main process (:class:`ChunkClaimBatchSampler` is the DataLoader's
batch sampler): DataLoader workers only ever receive index batches, so nothing in a forked worker
talks to the store. The main process asks the sampler for indexes only as workers free up
(``prefetch_factor`` batches per worker), which bounds how far a rank claims ahead.

Single-process runs have no store: a local counter hands out the same chunks in order.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Sampler

from mgpr.data.batching import uniform_batches
from mgpr.errors import RankFailedError, RankJoinError
from mgpr.outputs.rundir import RUN_DIR_ENV, rerun

log = logging.getLogger(__name__)

CHUNK_BATCHES = 2
"""Batches per claimed chunk: small enough that ranks finish together (the slowest rank's last
chunk is the imbalance), large enough that a store round trip (~0.1 ms) per chunk is noise."""

STATIC_SPLIT_ENV = "MGPR_BENCH_STATIC_SPLIT"
"""Benchmark/test-only switch: ``1`` gives each rank one equal contiguous slice of the remaining
tiles instead of claimed chunks (the behaviour before chunk claiming), so
``benchmarks/balance.py`` can measure both. Not a user option."""

KEY_PREFIX = "mgpr/"
CHUNK_KEY = KEY_PREFIX + "chunk"
REMAINING_KEY = KEY_PREFIX + "remaining"


class ChunkCounter(Protocol):
    """Hands out chunk numbers 0, 1, 2, ... once each, across every rank."""

    def next_chunk(self) -> int:
        """The next unclaimed chunk number (may be past the last chunk: nothing left)."""
        ...


class LocalCounter:
    """The counter of a single-process run (no process group, no store)."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def next_chunk(self) -> int:
        """The next chunk number."""
        return next(self._numbers)


class StoreCounter:
    """The process group's store counter: ``store.add(key, 1)`` is atomic on its server.

    Args:
        store: a ``torch.distributed.Store`` (the default group's, or a ``HashStore`` in tests).
        key: the counter's key; every rank of one run uses the same.
    """

    def __init__(self, store: Any, key: str = CHUNK_KEY) -> None:
        self.store = store
        self.key = key

    def next_chunk(self) -> int:
        """Claim one chunk: the counter's value before this rank's increment.

        Raises:
            RankFailedError: the store is gone: rank 0 (its server) failed or was killed.
        """
        try:
            return int(self.store.add(self.key, 1)) - 1
        except (RuntimeError, OSError) as exc:  # torch.distributed.DistError is a RuntimeError
            raise RankFailedError(
                "lost the connection to rank 0 while claiming tiles "
                f"({' '.join(str(exc).split())[:120]}): rank 0 failed or was killed; read its "
                "log (logs/rank0.log in the run directory), then "
                f"{rerun(os.environ.get(RUN_DIR_ENV))}"
            ) from None


class ChunkClaimBatchSampler(Sampler[list[int]]):
    """Batches of positions in the run's remaining-tile list, chunk by chunk as needed.

    A chunk is ``chunk_batches * batch_size`` consecutive positions; it is cut into batches
    of up to ``batch_size`` that never mix shape keys (band counts,
    :func:`mgpr.data.batching.uniform_batches`). The DataLoader asks for the next batch only
    when a worker is free, so chunks are claimed as the rank needs work.

    It has no ``__len__``: how many batches this rank gets is only known at the end, so
    Lightning treats the loader as one of unknown length (and runs no collective over lengths).

    Args:
        n_items: length of the remaining-tile list (identical on every rank).
        batch_size: most tiles per batch.
        counter: where chunk numbers come from.
        chunk_batches: batches per chunk (:data:`CHUNK_BATCHES`).
        keys: one shape key per position, or None when every tile has the same shape.
        static_slice: ``(rank, world_size)`` for the benchmark-only static split
            (:data:`STATIC_SPLIT_ENV`); None claims chunks.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        counter: ChunkCounter,
        chunk_batches: int = CHUNK_BATCHES,
        keys: Sequence[Hashable] | None = None,
        static_slice: tuple[int, int] | None = None,
    ) -> None:
        if batch_size < 1 or chunk_batches < 1:
            raise ValueError(
                f"need batch_size, chunk_batches >= 1, got {batch_size}, {chunk_batches}"
            )
        if keys is not None and len(keys) != n_items:
            raise ValueError(f"{len(keys)} shape keys for {n_items} items")
        self.n_items = n_items
        self.batch_size = batch_size  # read by TileLoader's /dev/shm check
        self.chunk_size = chunk_batches * batch_size
        self.counter = counter
        self.keys = keys
        self.static_slice = static_slice
        self.claimed_tiles = 0  # positions handed to the DataLoader by this rank
        self.claimed_chunks = 0

    def _chunks(self) -> Iterator[tuple[int, int]]:
        if self.static_slice is not None:
            yield static_bounds(self.n_items, *self.static_slice)
            return
        while True:
            start = self.counter.next_chunk() * self.chunk_size
            if start >= self.n_items:
                return
            yield start, min(self.n_items, start + self.chunk_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self._chunks():
            if stop <= start:
                continue
            self.claimed_chunks += 1
            for batch in uniform_batches(self.keys, start, stop, self.batch_size):
                self.claimed_tiles += len(batch)
                yield batch


def static_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous slice of ``n`` items; sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def static_split_requested(env: dict[str, str] | os._Environ[str]) -> bool:
    """Whether the benchmark-only static split (:data:`STATIC_SPLIT_ENV`) is switched on."""
    return env.get(STATIC_SPLIT_ENV, "") not in ("", "0")


def plan_digest(keys: Sequence[str]) -> bytes:
    """SHA-1 of the plan's tile keys in order: ranks with different plans must not share."""
    h = hashlib.sha1()
    for key in keys:
        h.update(key.encode())
        h.update(b"\n")
    return h.digest()


def encode_remaining(keys: Sequence[str], done: set[str]) -> bytes:
    """Rank 0's decision as bytes: the plan digest (20 bytes) + one bit per tile (1 = done)."""
    flags = np.fromiter((k in done for k in keys), dtype=bool, count=len(keys))
    return plan_digest(keys) + np.packbits(flags).tobytes()


def decode_remaining(keys: Sequence[str], payload: bytes, rank: int) -> list[int]:
    """Plan positions left to predict, from rank 0's decision (:func:`encode_remaining`).

    Raises:
        RankJoinError: this rank planned other tiles than rank 0 (different input files or
            settings on this node).
    """
    digest, packed = payload[:20], payload[20:]
    if digest != plan_digest(keys):
        raise RankJoinError(
            f"rank {rank} planned other tiles than rank 0 ({len(keys)} tiles here): every rank "
            "must see the same input files (same paths, sizes and contents) and the same "
            "settings; check input_path on every node"
        )
    flags = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=len(keys)).astype(bool)
    return np.flatnonzero(~flags).tolist()


def share_remaining(
    keys: Sequence[str], rank: int, store: Any | None, done_set: Any
) -> tuple[list[int], int]:
    """Plan positions still to predict, decided by rank 0 and told to the others.

    Args:
        keys: tile keys of the whole plan, in plan order (computed by every rank).
        rank: this process's global rank.
        store: the process group's store, or None for a single-process run.
        done_set: callable returning the keys of finished tiles; called on rank 0 only.

    Returns:
        ``(positions left, in plan order; number of plan tiles already finished)``.
    """
    if rank == 0:
        payload = encode_remaining(keys, set(done_set()))
        if store is not None:
            store.set(REMAINING_KEY, payload)
    else:
        assert store is not None, "a rank other than 0 needs the process group's store"
        payload = bytes(store.get(REMAINING_KEY))  # waits for rank 0 (join_timeout_s at most)
    remaining = decode_remaining(keys, payload, rank)
    return remaining, len(keys) - len(remaining)


def default_store() -> Any | None:
    """The default process group's store, or None when no process group exists."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
