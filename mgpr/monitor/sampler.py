"""Sampling one rank's device on a daemon thread: exact averages and peaks, a bounded series.

:class:`DeviceSampler` reads NVML (device memory used by all processes, utilisation),
``torch.cuda`` memory of this process and the host RSS at a fixed interval. Every reading
updates exact running statistics; :class:`SampleBuffer` keeps an evenly thinned series of at
most ``max_samples`` readings for the plot, so memory stays flat however long the run. Imports
neither Lightning nor (at import time) torch or pynvml.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mgpr.errors import ConfigError
from mgpr.monitor.nvml import GpuInfo, Nvml

logger = logging.getLogger(__name__)

#: Default cap on kept samples per rank; beyond it the series is thinned 2:1 (memory stays flat).
MAX_SAMPLES = 10_000


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
        nvml: the NVML session that opened ``gpu``.
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
        nvml: Nvml | None,
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
        self.nvml = nvml
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
        if self.gpu is not None and self.nvml is not None:
            gpu, nvml = self.gpu, self.nvml
            mem = self._read("NVML memory", lambda: nvml.memory(gpu.handle))
            mem_used = None if mem is None else int(mem[0])
            if not gpu.mig:
                util = self._read("NVML utilisation", lambda: nvml.utilization(gpu.handle))
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
