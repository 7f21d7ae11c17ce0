"""NVML for the run monitor: the rank's own GPU, found by the uuid CUDA gives its device.

A rank asks torch for the uuid of its LOCAL CUDA device
(``torch.cuda.get_device_properties(i).uuid``) and opens that device in NVML with
``nvmlDeviceGetHandleByUUID``. CUDA has already applied ``CUDA_VISIBLE_DEVICES`` (indices, uuids,
MIG instances) and ``CUDA_DEVICE_ORDER`` to its ordinals, so nothing here re-parses them, and the
global rank is never used (on a second node global rank 4 is local device 0).

:class:`Nvml` wraps a ``pynvml``-like module (package ``nvidia-ml-py``); tests inject a fake
module with known devices and readings. This module imports neither Lightning nor torch, and
pynvml only when no module is injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """The GPU (or MIG instance) a rank uses, as NVML knows it.

    Attributes:
        handle: NVML device handle (opaque).
        physical_index: NVML index of the physical GPU (the parent GPU of a MIG instance).
        uuid: full uuid of the device the rank uses, ``"GPU-..."`` or ``"MIG-..."``.
        name: product name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        memory_total_bytes: device (or MIG instance) memory, bytes.
        mig: True for a MIG instance; NVML reports no utilisation for it, so none is sampled.
    """

    handle: Any = field(repr=False, compare=False)
    physical_index: int | None
    uuid: str
    name: str
    memory_total_bytes: int
    mig: bool = False


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def nvml_uuid_candidates(cuda_uuid: str) -> list[str]:
    """The NVML uuids a CUDA device uuid can stand for, most likely first.

    torch prints the 16 uuid bytes without a prefix; NVML names a whole GPU ``GPU-<uuid>`` and a
    MIG instance ``MIG-<uuid>`` (R470+ drivers). A uuid that already has a prefix is kept as is.
    """
    uuid = cuda_uuid.strip()
    if uuid.startswith(("GPU-", "MIG-")):
        return [uuid]
    return [f"GPU-{uuid}", f"MIG-{uuid}"]


class Nvml:
    """An open NVML session.

    Args:
        module: a ``pynvml``-like module; None imports ``pynvml``.

    Raises:
        Exception: from ``nvmlInit`` when the NVML library or driver is missing
            (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``), or ImportError
            without pynvml. :func:`open_nvml` turns these into ``None`` plus a reason.
    """

    def __init__(self, module: ModuleType | Any | None = None) -> None:
        if module is None:
            import pynvml as module
        module.nvmlInit()
        self._nvml = module

    def close(self) -> None:
        """Release NVML (``nvmlShutdown``); errors are ignored."""
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a monitor must never fail a run
            pass

    def gpu(self, cuda_uuid: str) -> GpuInfo:
        """Open the device whose uuid CUDA reports (with or without ``GPU-``/``MIG-``).

        Raises:
            Exception: the NVML error of the last candidate uuid when no device has it.
        """
        nvml = self._nvml
        handle, error = None, None
        for candidate in nvml_uuid_candidates(cuda_uuid):
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(candidate)
                break
            except nvml.NVMLError as exc:
                error = exc
        if handle is None:
            assert error is not None
            raise error
        try:
            mig = bool(nvml.nvmlDeviceIsMigDeviceHandle(handle))
        except nvml.NVMLError:  # drivers or GPUs without MIG support
            mig = False
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle) if mig else handle
        try:
            physical_index: int | None = int(nvml.nvmlDeviceGetIndex(parent))
        except nvml.NVMLError:
            physical_index = None
        _, total = self.memory(handle)
        return GpuInfo(
            handle=handle,
            physical_index=physical_index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_bytes=total,
            mig=mig,
        )

    def memory(self, handle: Any) -> tuple[int, int]:
        """Device memory ``(used, total)`` in bytes, all processes together."""
        info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def utilization(self, handle: Any) -> int:
        """Share of the last sample period (1/6 s to 1 s) in which a kernel ran, 0-100 (%)."""
        return int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def open_nvml(module: ModuleType | Any | None = None) -> tuple[Nvml | None, str]:
    """Open NVML if it can be opened.

    Returns:
        ``(nvml, "")`` on success, ``(None, reason)`` when pynvml is not installed or
        ``nvmlInit`` fails (no driver, no ``libnvidia-ml.so``).
    """
    try:
        return Nvml(module), ""
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no NVML"
        return None, f"{type(exc).__name__}: {exc}"
