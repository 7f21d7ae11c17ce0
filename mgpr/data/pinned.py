"""Pinned host memory for GPU runs: the batch pool's buffers registered once, no per-batch copy.

Why: a DataLoader with ``pin_memory=True`` gives every batch to a pin thread that copies it out
of the worker's shared memory into fresh pinned memory (one memcpy of the whole batch, ~50 MB
for 16 RGB tiles of 1024 px, plus an allocation), so a GPU rank pays a host copy per batch on
top of the DMA to the device, and the pool's mapping cache (:mod:`mgpr.data.batch_pool`) is
bypassed. Registering each pool slot's shared memory as page-locked (``cudaHostRegister``)
once, in the rank's main process where the batch arrives, makes the batch itself pinned: the
DataLoader then runs with ``pin_memory=False`` and ``tensor.to(device, non_blocking=True)``
copies straight from the slot by DMA.

:func:`host_memory_plan` decides which of the two a run uses; :class:`CudaHostRegistrar` is the
real registration, any object with the same two methods stands in for it in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class HostRegistrar(Protocol):
    """Registers host memory ranges as pinned (page-locked) for the GPU, and unregisters them."""

    def register(self, ptr: int, nbytes: int) -> None:
        """Page-lock ``nbytes`` bytes at address ``ptr``; raises on failure."""

    def unregister(self, ptr: int) -> None:
        """Undo :meth:`register` for the range starting at ``ptr``."""


class CudaHostRegistrar:
    """``cudaHostRegister`` / ``cudaHostUnregister`` through torch's CUDA runtime bindings.

    Call only in a process whose CUDA device is the rank's (after Lightning set it), so the
    registration does not create a context on another GPU.
    """

    def register(self, ptr: int, nbytes: int) -> None:
        """Page-lock a range (flags 0: ``cudaHostRegisterDefault``)."""
        import torch

        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, 0))

    def unregister(self, ptr: int) -> None:
        """Unlock a range registered before."""
        import torch

        cudart = torch.cuda.cudart()
        torch.cuda.check_error(cudart.cudaHostUnregister(ptr))


@dataclass(frozen=True, slots=True)
class HostMemoryPlan:
    """How a rank's batches become pinned host memory.

    Attributes:
        loader_pin_memory: the DataLoader's ``pin_memory`` (its pin thread copies each batch).
        register_pool: register the pool's shared buffers once instead (no per-batch copy).
    """

    loader_pin_memory: bool
    register_pool: bool


def host_memory_plan(gpu: bool, workers: int, pooled: bool) -> HostMemoryPlan:
    """Pinned pool on GPU runs with a batch pool; the DataLoader's pin copy where there is none.

    Args:
        gpu: the rank copies batches to a CUDA device.
        workers: DataLoader worker processes (the pool exists only with workers).
        pooled: the dataset decodes into a :class:`~mgpr.data.batch_pool.SharedBatchPool`
            (``TileDataset``; the fake-data dataset does not).

    Returns:
        CPU runs: neither (unchanged). GPU with workers and a pool: registration, no pin copy.
        GPU otherwise (``workers=0``, fake data): the DataLoader's ``pin_memory=True``.
    """
    if not gpu:
        return HostMemoryPlan(loader_pin_memory=False, register_pool=False)
    if workers > 0 and pooled:
        return HostMemoryPlan(loader_pin_memory=False, register_pool=True)
    return HostMemoryPlan(loader_pin_memory=True, register_pool=False)


class PinnedSlots:
    """Which pool slots are registered, at which address: each mapping registered exactly once.

    A slot's buffer is re-registered only when the worker regrew it (a new segment, new
    address); the old range is unregistered first. A failed registration is logged once and
    turns registration off for the rest of the iteration: the batches are then copied from
    pageable memory, which is slower but correct.

    Args:
        registrar: the real :class:`CudaHostRegistrar` or a test double.
    """

    def __init__(self, registrar: HostRegistrar) -> None:
        self.registrar = registrar
        self.ranges: dict[int, tuple[int, int]] = {}  # slot -> (ptr, nbytes)
        self.registrations = 0
        self.failed: str | None = None

    def ensure(self, slot: int, ptr: int, nbytes: int) -> bool:
        """Make sure ``slot``'s current mapping ``(ptr, nbytes)`` is registered; True if it is."""
        if self.failed is not None:
            return False
        known = self.ranges.get(slot)
        if known == (ptr, nbytes):
            return True
        if known is not None:
            del self.ranges[slot]
            try:
                self.registrar.unregister(known[0])
            except Exception as exc:  # the old range is dropped either way
                log.warning("could not unpin a regrown batch buffer: %s", exc)
        try:
            self.registrar.register(ptr, nbytes)
        except Exception as exc:  # CudaError, or a driver that refuses shared memory
            self.failed = " ".join(str(exc).split())[:200] or type(exc).__name__
            log.warning(
                "could not pin the batch buffers (%s): batches are copied to the GPU from "
                "pageable memory, which is slower",
                self.failed,
            )
            return False
        self.ranges[slot] = (ptr, nbytes)
        self.registrations += 1
        return True

    def release_all(self) -> None:
        """Unregister every range (before the pool drops its mappings)."""
        for ptr, _ in self.ranges.values():
            try:
                self.registrar.unregister(ptr)
            except Exception as exc:  # never let cleanup hide the run's own outcome
                log.warning("could not unpin a batch buffer: %s", exc)
        self.ranges = {}
