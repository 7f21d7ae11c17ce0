"""GPU access for the run monitor: NVML behind a small interface, rank -> physical GPU, sampling.

Three pieces, each testable without a GPU:

* :class:`GpuBackend` is the narrow protocol the monitor needs from NVML. :class:`NvmlBackend`
  implements it with ``pynvml`` (package ``nvidia-ml-py``); tests feed a fake with known readings.
* :func:`physical_gpu_for_local_device` maps the LOCAL CUDA index a rank uses
  (``trainer.strategy.root_device.index``) to the physical GPU NVML knows, honouring
  ``CUDA_VISIBLE_DEVICES`` (indices, full or abbreviated ``GPU-`` UUIDs, ``MIG-`` instances).
  Never use the global rank for this: on the second node global rank 4 is local device 0, and
  under ``CUDA_VISIBLE_DEVICES=3,5`` local device 1 is physical GPU 5.
  :func:`resolve_gpu` turns the resulting :class:`GpuSelector` into a :class:`GpuInfo`.
* :class:`DeviceSampler` samples one device (or the host) at a fixed interval on a daemon thread,
  keeps exact running averages and peaks, and a bounded, evenly thinned series for the plot.

This module imports neither Lightning nor (at import time) torch or pynvml.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mgpr.errors import ConfigError

logger = logging.getLogger(__name__)

#: Default cap on kept samples per rank; beyond it the series is thinned 2:1 (memory stays flat).
MAX_SAMPLES = 10_000


@runtime_checkable
class GpuBackend(Protocol):
    """What the monitor needs from NVML. Every method may raise; callers catch and degrade."""

    def device_count(self) -> int:
        """Return the number of physical GPUs NVML sees (ignores ``CUDA_VISIBLE_DEVICES``)."""
        ...

    def handle_for(self, physical_index: int | None, uuid: str | None) -> Any:
        """Return a device handle by physical NVML index, or by FULL uuid when index is None."""
        ...

    def name(self, h: Any) -> str:
        """Return the product name, e.g. ``"NVIDIA H100 80GB HBM3"``."""
        ...

    def uuid(self, h: Any) -> str:
        """Return the full uuid, ``"GPU-xxxxxxxx-xxxx-..."`` (or ``"MIG-..."``)."""
        ...

    def memory(self, h: Any) -> tuple[int, int]:
        """Return device memory ``(used, total)`` in bytes, all processes together."""
        ...

    def utilization(self, h: Any) -> int:
        """Return the % of the last sample period (1/6 s to 1 s) in which a kernel ran, 0-100."""
        ...


class NvmlBackend:
    """:class:`GpuBackend` over ``pynvml``.

    Raises:
        pynvml.NVMLError: from ``__init__`` when the NVML library or driver is missing
            (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``). Use
            :func:`open_nvml_backend` to get ``None`` plus a reason instead.
    """

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml

    def close(self) -> None:
        """Release NVML (``nvmlShutdown``); errors are ignored."""
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a monitor must never fail a run
            pass

    def device_count(self) -> int:  # noqa: D102
        return int(self._nvml.nvmlDeviceGetCount())

    def handle_for(self, physical_index: int | None, uuid: str | None) -> Any:  # noqa: D102
        if physical_index is not None:
            return self._nvml.nvmlDeviceGetHandleByIndex(physical_index)
        if uuid is None:
            raise ValueError("handle_for needs a physical_index or a uuid")
        return self._nvml.nvmlDeviceGetHandleByUUID(uuid)

    def name(self, h: Any) -> str:  # noqa: D102
        return _text(self._nvml.nvmlDeviceGetName(h))

    def uuid(self, h: Any) -> str:  # noqa: D102
        return _text(self._nvml.nvmlDeviceGetUUID(h))

    def memory(self, h: Any) -> tuple[int, int]:  # noqa: D102
        info = self._nvml.nvmlDeviceGetMemoryInfo(h)
        return int(info.used), int(info.total)

    def utilization(self, h: Any) -> int:  # noqa: D102
        return int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_nvml_backend() -> tuple[NvmlBackend | None, str]:
    """Open NVML if it can be opened.

    Returns:
        ``(backend, "")`` on success, ``(None, reason)`` when pynvml is not installed or
        ``nvmlInit`` fails (no driver, no ``libnvidia-ml.so``).
    """
    try:
        return NvmlBackend(), ""
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no NVML"
        return None, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class GpuSelector:
    """Which physical GPU a rank's local CUDA device is, before asking NVML.

    Attributes:
        local_index: the CUDA ordinal the process uses (``cuda:<local_index>``).
        physical_index: NVML index when known from an index list or identity, else None.
        uuid: full or abbreviated uuid from ``CUDA_VISIBLE_DEVICES`` or torch, else None.
        mig: True when the device is a MIG instance (NVML gives memory only, no utilisation).
        source: ``"identity"`` (variable unset), ``"CUDA_VISIBLE_DEVICES"`` or ``"torch"``.
    """

    local_index: int
    physical_index: int | None
    uuid: str | None = None
    mig: bool = False
    source: str = "identity"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """A resolved physical GPU.

    Attributes:
        handle: backend handle (opaque).
        physical_index: NVML index (None for a MIG instance).
        uuid: full uuid as NVML reports it.
        name: product name.
        memory_total_bytes: device (or MIG instance) memory, bytes.
        mig: True for a MIG instance; utilisation is then not sampled.
    """

    handle: Any = field(repr=False, compare=False)
    physical_index: int | None
    uuid: str
    name: str
    memory_total_bytes: int
    mig: bool = False


def _strtoul_prefix(text: str) -> int:
    """Leading decimal digits of ``text`` as CUDA's strtoul reads them; -1 when none or negative."""
    digits = ""
    for char in text:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else -1


def _visible_entries(value: str) -> list[str]:
    """Parse ``CUDA_VISIBLE_DEVICES`` the way the CUDA runtime (and torch) does.

    Entries are comma separated and stripped. UUID lists (``GPU-``/``MIG-``) stop at the first
    entry without the prefix of the first one; index lists stop at the first entry that does not
    start with a non-negative integer (``"0,1,-1,3"`` is ``0,1``); a repeated entry makes the whole
    list empty (no device visible), as in CUDA.
    """
    parts = [p.strip() for p in value.split(",")]
    out: list[str] = []
    first = parts[0] if parts else ""
    prefix = next((p for p in ("GPU-", "MIG-") if first.startswith(p)), None)
    for part in parts:
        if prefix is not None:
            if not part.startswith(prefix):
                break
            entry = part
        else:
            number = _strtoul_prefix(part)
            if number < 0:
                break
            entry = str(number)
        if entry in out:
            return []
        out.append(entry)
    return out


def physical_gpu_for_local_device(local_cuda_index: int, env: Mapping[str, str]) -> GpuSelector:
    """Map a rank's LOCAL CUDA device index to the physical GPU.

    Pass the local device index (``trainer.strategy.root_device.index`` or
    ``torch.cuda.current_device()``), never the global rank.

    * ``CUDA_VISIBLE_DEVICES`` unset: identity (local 1 -> physical 1).
    * indices, e.g. ``"3,5"``: local 1 -> physical 5.
    * uuids, e.g. ``"GPU-8932f937,GPU-1b2c"``: the uuid (possibly an abbreviated prefix), resolved
      against NVML by :func:`resolve_gpu`.
    * ``"MIG-..."``: a MIG instance; NVML reports memory only (no utilisation) for it.

    Index lists are CUDA ordinals. They equal NVML (PCI bus) indices when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (what SLURM's gres binding uses) or on nodes with identical
    GPUs; the monitor therefore prefers the uuid torch reports when it has one.

    Args:
        local_cuda_index: CUDA ordinal inside this process, >= 0.
        env: environment, e.g. ``os.environ``.

    Returns:
        The selector for :func:`resolve_gpu`.

    Raises:
        ConfigError: ``local_cuda_index`` is negative or not among the visible devices.
    """
    if local_cuda_index < 0:
        raise ConfigError(f"local CUDA device index must be >= 0, got {local_cuda_index}")
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return GpuSelector(local_index=local_cuda_index, physical_index=local_cuda_index)
    entries = _visible_entries(value)
    if local_cuda_index >= len(entries):
        raise ConfigError(
            f"local CUDA device {local_cuda_index} is not visible: CUDA_VISIBLE_DEVICES={value!r} "
            f"makes {len(entries)} device(s) visible; check --gpus-per-node/--ntasks-per-node"
        )
    entry = entries[local_cuda_index]
    source = "CUDA_VISIBLE_DEVICES"
    if entry.startswith("MIG-"):
        return GpuSelector(local_cuda_index, None, uuid=entry, mig=True, source=source)
    if entry.startswith("GPU-"):
        return GpuSelector(local_cuda_index, None, uuid=entry, source=source)
    return GpuSelector(local_cuda_index, int(entry), source=source)


def resolve_gpu(selector: GpuSelector, backend: GpuBackend) -> GpuInfo:
    """Find the selected GPU in NVML.

    An abbreviated uuid matches the one device whose uuid starts with it (case-insensitive), as
    CUDA does. A MIG uuid is looked up directly (MIG instances are not enumerated by index).

    Raises:
        ConfigError: no device, or more than one, matches the selector.
        Exception: whatever the backend raises (NVML errors); callers degrade.
    """
    if selector.mig:
        assert selector.uuid is not None
        handle = backend.handle_for(None, selector.uuid)
        _, total = backend.memory(handle)
        return GpuInfo(handle, None, backend.uuid(handle), backend.name(handle), total, mig=True)
    if selector.physical_index is not None:
        index = selector.physical_index
        count = backend.device_count()
        if index >= count:
            raise ConfigError(
                f"physical GPU {index} (local device {selector.local_index}, from "
                f"{selector.source}) does not exist: NVML sees {count} GPU(s)"
            )
        handle = backend.handle_for(index, None)
        uuid = backend.uuid(handle)
    else:
        assert selector.uuid is not None
        wanted = selector.uuid.lower()
        matches: list[tuple[int, Any, str]] = []
        for i in range(backend.device_count()):
            h = backend.handle_for(i, None)
            u = backend.uuid(h)
            if u.lower().startswith(wanted):
                matches.append((i, h, u))
        if len(matches) != 1:
            what = "no GPU" if not matches else f"{len(matches)} GPUs"
            raise ConfigError(
                f"{what} match uuid {selector.uuid!r} (local device {selector.local_index}, "
                f"from {selector.source}); give a longer uuid prefix"
            )
        index, handle, uuid = matches[0]
    _, total = backend.memory(handle)
    return GpuInfo(handle, index, uuid, backend.name(handle), total)


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading. Fields a source cannot give are None.

    Attributes:
        t_s: seconds since the run started (monotonic clock).
        mem_used_bytes: device memory used, all processes (NVML), bytes.
        util_pct: NVML GPU utilisation (share of time a kernel ran), %.
        torch_allocated_bytes: ``torch.cuda.memory_allocated`` of this process, bytes.
        torch_reserved_bytes: ``torch.cuda.memory_reserved`` (caching allocator), bytes.
        torch_max_allocated_bytes: ``torch.cuda.max_memory_allocated``, bytes.
        rss_bytes: resident set size of this rank's main process (not its workers), bytes.
    """

    t_s: float
    mem_used_bytes: int | None = None
    util_pct: float | None = None
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    torch_max_allocated_bytes: int | None = None
    rss_bytes: int | None = None


#: Fields of :class:`Sample`, in order; also the column names of a report part's ``samples``.
SAMPLE_FIELDS: tuple[str, ...] = (
    "t_s",
    "mem_used_bytes",
    "util_pct",
    "torch_allocated_bytes",
    "torch_reserved_bytes",
    "torch_max_allocated_bytes",
    "rss_bytes",
)


class _Running:
    """Count, sum and max of the non-None values seen."""

    __slots__ = ("n", "total", "peak")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.peak: float | None = None

    def add(self, value: float | None) -> None:
        if value is None:
            return
        self.n += 1
        self.total += value
        self.peak = value if self.peak is None else max(self.peak, value)

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


class SampleBuffer:
    """Bounded, evenly spaced sample series plus exact running statistics.

    Every sample updates the statistics (exact averages and peaks over the whole run). The series
    keeps at most ``max_samples`` samples: when full it drops every other one and from then on keeps
    only every ``stride``-th sample, so the kept samples stay evenly spaced and memory stays flat.
    """

    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        if max_samples < 2:
            raise ConfigError(f"max_samples must be >= 2, got {max_samples}")
        self.max_samples = max_samples
        self.stride = 1
        self.seen = 0
        self._kept: list[Sample] = []
        self._stats = {name: _Running() for name in SAMPLE_FIELDS[1:]}
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        """Record one sample (thread-safe)."""
        with self._lock:
            for name, running in self._stats.items():
                running.add(getattr(sample, name))
            if self.seen % self.stride == 0:
                self._kept.append(sample)
                if len(self._kept) > self.max_samples:
                    self._kept = self._kept[::2]
                    self.stride *= 2
            self.seen += 1

    def columns(self) -> dict[str, list[float | int | None]]:
        """Return the kept series as columns named by :data:`SAMPLE_FIELDS`."""
        with self._lock:
            kept = list(self._kept)
        return {name: [getattr(s, name) for s in kept] for name in SAMPLE_FIELDS}

    def stats(self) -> dict[str, float | int | None]:
        """Exact statistics over every sample taken (not only the kept ones).

        Returns:
            ``samples`` (count), and for each field ``<field>_avg`` and ``<field>_peak`` (same
            unit as the field; None when that field was never available).
        """
        with self._lock:
            out: dict[str, float | int | None] = {"samples": self.seen}
            for name, running in self._stats.items():
                out[f"{name}_avg"] = running.mean()
                out[f"{name}_peak"] = running.peak
        return out

    def __len__(self) -> int:
        return len(self._kept)


class DeviceSampler:
    """Samples one GPU (NVML + torch.cuda) and the host RSS at a fixed interval on a daemon thread.

    Any error from a source is logged once (warning) and that field becomes None; the sampler
    never raises into the run.

    Args:
        gpu: the resolved GPU, or None (no GPU or no NVML): then no NVML fields are sampled.
        backend: the backend that resolved ``gpu``.
        torch_device_index: local CUDA ordinal for ``torch.cuda`` memory stats, or None.
        interval_s: seconds between samples, > 0.
        t0: monotonic time (s) the run started; ``t_s`` of samples is relative to it.
        max_samples: cap of the kept series (see :class:`SampleBuffer`).
        clock: monotonic clock in seconds (tests may pass a fake).
        on_tick: called after every sample with the current monotonic time (s), on the thread;
            used for the progress display. Its exceptions are logged once and swallowed.
        sample_rss: sample the host RSS of this process (psutil).
        log_prefix: prepended to warnings, e.g. ``"[rank: 3] "``.
    """

    def __init__(
        self,
        *,
        gpu: GpuInfo | None,
        backend: GpuBackend | None,
        torch_device_index: int | None,
        interval_s: float,
        t0: float | None = None,
        max_samples: int = MAX_SAMPLES,
        clock: Callable[[], float] = time.monotonic,
        on_tick: Callable[[float], None] | None = None,
        sample_rss: bool = True,
        log_prefix: str = "",
    ) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ConfigError(
                f"monitor interval_s must be a positive number of seconds, got {interval_s}"
            )
        self.gpu = gpu
        self.backend = backend
        self.torch_device_index = torch_device_index
        self.interval_s = float(interval_s)
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.buffer = SampleBuffer(max_samples)
        self.on_tick = on_tick
        self.log_prefix = log_prefix
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: Any = None
        if sample_rss:
            try:
                import psutil

                self._process = psutil.Process()
            except Exception as exc:  # noqa: BLE001
                self._warn_once("rss", f"host RSS unavailable: {exc}")
        self._torch_cuda: Any = None
        if torch_device_index is not None:
            import torch

            self._torch_cuda = torch.cuda

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%srun monitor: %s (continuing without it)", self.log_prefix, message)

    def _read(self, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a monitor never stops a run
            self._warn_once(key, f"reading {key} failed: {type(exc).__name__}: {exc}")
            return None

    def sample_once(self) -> Sample:
        """Take one sample now, record it, and return it."""
        now = self.clock()
        mem_used = util = alloc = reserved = max_alloc = rss = None
        if self.gpu is not None and self.backend is not None:
            gpu, backend = self.gpu, self.backend
            mem = self._read("NVML memory", lambda: backend.memory(gpu.handle))
            mem_used = None if mem is None else int(mem[0])
            if not gpu.mig:
                util = self._read("NVML utilisation", lambda: backend.utilization(gpu.handle))
        if self._torch_cuda is not None:
            cuda, idx = self._torch_cuda, self.torch_device_index
            alloc = self._read("torch.cuda memory", lambda: int(cuda.memory_allocated(idx)))
            reserved = self._read("torch.cuda memory", lambda: int(cuda.memory_reserved(idx)))
            max_alloc = self._read("torch.cuda memory", lambda: int(cuda.max_memory_allocated(idx)))
        if self._process is not None:
            proc = self._process
            rss = self._read("host RSS", lambda: int(proc.memory_info().rss))
        sample = Sample(
            t_s=now - self.t0,
            mem_used_bytes=mem_used,
            util_pct=None if util is None else float(util),
            torch_allocated_bytes=alloc,
            torch_reserved_bytes=reserved,
            torch_max_allocated_bytes=max_alloc,
            rss_bytes=rss,
        )
        self.buffer.add(sample)
        return sample

    def _run(self) -> None:
        start = self.clock()
        k = 0
        while True:
            try:
                self.sample_once()
            except Exception as exc:  # noqa: BLE001
                self._warn_once("sample", f"sampling failed: {type(exc).__name__}: {exc}")
            if self.on_tick is not None:
                try:
                    self.on_tick(self.clock())
                except Exception as exc:  # noqa: BLE001
                    self._warn_once("progress", f"progress display failed: {exc}")
            k += 1
            # fixed schedule (start + k * interval), so slow samples do not stretch the interval
            delay = start + k * self.interval_s - self.clock()
            if delay < 0:  # fell behind (suspended, overloaded host): skip missed ticks
                k += int(-delay // self.interval_s) + 1
                delay = start + k * self.interval_s - self.clock()
            if self._stop.wait(max(0.0, delay)):
                return

    def start(self) -> None:
        """Start the daemon sampling thread (takes the first sample at once). Idempotent."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mgpr-run-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` seconds for it. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        """True while the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()
