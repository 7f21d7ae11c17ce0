"""Run monitor: is the multi-GPU job using its GPUs, and is data loading holding it back?

:class:`RunMonitor` is a Lightning callback. On every rank it samples the rank's OWN GPU (found
from the local CUDA device, never the global rank; see :mod:`mgpr.monitor.gpu`) on a daemon
thread, times every predict batch (data wait vs compute), takes stage times the lead's code
reports (:meth:`RunMonitor.record_stage`), shows whole-job progress on rank 0, and at the end
writes one report part per rank. :func:`mgpr.monitor.report.build_report` (rank 0, after the
barrier)
merges the parts into ``report.json`` + ``report.png``.

Wiring (lead)::

    monitor = RunMonitor(run_dir, total_tiles=n_tiles_all_ranks, progress=sys.stderr.isatty(),
                         progress_source=lambda: count_done_rows(run_dir))
    trainer = Trainer(..., callbacks=[writer, monitor], enable_progress_bar=False,
                      profiler=make_profiler(cfg.profiler, run_dir))
    # in the module / writer (main thread, blocking time only):
    with monitor.stage("postprocess"): records = adapter.postprocess(out)
    monitor.record_stage("write", seconds)
    trainer.predict(..., return_predictions=False)
    # all ranks: barrier; then rank 0:
    report = build_report(run_dir, world_size, {"workers": 2, "batch_size": 16,
                          "precision": "bf16-mixed", "cpus_per_task": 16})
    print(format_report(report))

Timing model, per rank (all seconds, monotonic clock)::

    wall_s      = on_predict_start -> on_predict_end
    data_wait_s = sum over batches of (on_predict_batch_start - end of previous batch, or
                  predict start for the first), minus stage time recorded in that gap. Includes
                  the DataLoader fetch, worker start-up (first batch) and host->device copy
                  (Lightning moves the batch before on_predict_batch_start).
    compute_s   = sum of (on_predict_batch_start -> on_predict_batch_end, after
                  torch.cuda.synchronize on CUDA so queued kernels are counted) minus stage
                  time recorded inside the batch.
    stages_s    = record_stage() totals from the main thread (blocking); time from other
                  threads goes to stages_background_s (overlapped, not part of the partition).
    other       = wall_s - data_wait_s - compute_s - sum(stages_s) (hooks, epoch end, tail).

Report part ``run_dir/report_parts/rank{global_rank}.json`` (schema ``mgpr.report_part/1``):

    ============================  =======  =========================================================
    key                           type     meaning (unit)
    ============================  =======  =========================================================
    schema                        str      ``"mgpr.report_part/1"``
    status                        str      ``"finished"``, or ``"failed"`` (from on_exception)
    error                         str|null exception type and message when failed
    hostname                      str      node name (SLURMD_NODENAME under SLURM, else host)
    global_rank, local_rank,      int      Lightning ranks; world_size = number of ranks
    node_rank, world_size
    device                        str      ``"cuda:0"`` (local ordinal) or ``"cpu"``
    monitor_source                str      ``"nvml"``, ``"nvml-mig"`` (memory only), ``"torch"``
                                           (CUDA without NVML) or ``"host"`` (CPU: RSS only)
    gpu                           obj|null name, uuid, physical_index (NVML index, null for MIG),
                                           memory_total_bytes (bytes), mig (bool), selector_source
    host_memory_total_bytes       int      physical memory of the node (bytes)
    interval_s                    float    sampling interval (s)
    wall_s, data_wait_s,          float    see timing model (s)
    compute_s
    stages_s                      obj      stage name -> blocking seconds (s)
    stages_background_s           obj      stage name -> seconds recorded from other threads (s)
    batches, tiles                int      batches and tiles this rank predicted
    tiles_per_s                   float    tiles / wall_s (tiles/s)
    steady_tiles_per_s            float|null tiles after the first batch / time after it (tiles/s):
                                           the rate without start-up (workers starting, kernel
                                           choice); null with fewer than two batches
    predict_start_unix_s,         float|null wall-clock time (s since the epoch) of predict start
    first_batch_unix_s                     and of the first batch's arrival (start-up figures)
    cuda_synchronized             bool     compute_s measured with a sync at batch end
    stats                         obj      exact over ALL samples: samples (count) and
                                           <field>_avg / <field>_peak for every sample field
    samples                       obj      columns, evenly thinned to <= 10 000 rows: t_s (s since
                                           predict start), mem_used_bytes (NVML, all processes,
                                           bytes), util_pct (NVML busy share, %),
                                           torch_allocated_bytes, torch_reserved_bytes,
                                           torch_max_allocated_bytes, rss_bytes (bytes); null
                                           where a source is unavailable
    ============================  =======  =========================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning_utilities.core.rank_zero import rank_prefixed_message

from mgpr.errors import ConfigError
from mgpr.monitor.gpu import (
    MAX_SAMPLES,
    DeviceSampler,
    GpuBackend,
    GpuInfo,
    GpuSelector,
    NvmlBackend,
    open_nvml_backend,
    physical_gpu_for_local_device,
    resolve_gpu,
)
from mgpr.monitor.report import build_report, format_report  # re-exported
from mgpr.outputs.rundir import write_json_atomic

__all__ = [
    "PROFILERS",
    "RunMonitor",
    "build_report",
    "find_run_monitor",
    "format_report",
    "make_profiler",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

#: The message logged once when a run has no GPU (or no NVML) to watch.
NO_GPU_MESSAGE = "no GPU/NVML: reporting host RSS and CPU timing"
PART_SCHEMA = "mgpr.report_part/1"
#: Valid values of the ``profiler`` config key.
PROFILERS = ("simple", "advanced", "pytorch")


def make_profiler(name: str | None, run_dir: Path) -> Any:
    """Translate the ``profiler`` config key into what ``Trainer(profiler=...)`` accepts.

    Args:
        name: None / ``""`` / ``"none"`` (no profiler), ``"simple"`` (per-hook wall times),
            ``"advanced"`` (cProfile per hook) or ``"pytorch"`` (torch.profiler, CPU and CUDA ops,
            Chrome traces written to ``run_dir``).
        run_dir: run directory; the PyTorch profiler writes its files there.

    Returns:
        None, ``"simple"``, ``"advanced"`` or a ``PyTorchProfiler``.

    Raises:
        ConfigError: any other value.
    """
    key = "none" if name is None else str(name).strip().lower()
    if key in ("", "none", "null"):
        return None
    if key in ("simple", "advanced"):
        return key
    if key == "pytorch":
        from lightning.pytorch.profilers import PyTorchProfiler

        return PyTorchProfiler(dirpath=run_dir, filename="pytorch-profile")
    raise ConfigError(f"profiler={name!r} is not known; use one of: none, {', '.join(PROFILERS)}")


def _batch_len(batch: Any) -> int:
    """Tiles in a batch: ``len(batch["index"])`` for mgpr batches, else the leading dimension."""
    if isinstance(batch, Mapping):
        for key in ("index", "image"):
            if key in batch:
                return len(batch[key])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, list | tuple) and batch:
        return _batch_len(batch[0])
    return 1


def _hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360_000_000:
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(done: int, total: int | None, elapsed_s: float) -> str:
    """``"progress: 1234/5000 tiles (24.7%), 41.2 tiles/s, ETA 00:01:31"`` (whole job)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        eta = (total - done) / rate if rate > 0 else None
        pct = 100.0 * done / total
        return f"progress: {done}/{total} tiles ({pct:.1f}%), {rate:.1f} tiles/s, ETA {_hms(eta)}"
    return f"progress: {done} tiles, {rate:.1f} tiles/s"


class _Progress:
    r"""Whole-job progress on rank 0: a one-line ``\r`` bar on a TTY, else a log line every N s."""

    def __init__(
        self,
        *,
        t0: float,
        total: int | None,
        source: Callable[[], int],
        tty: bool,
        log_every_s: float,
        stream: IO[str],
    ) -> None:
        self.t0 = t0
        self.total = total
        self.source = source
        self.tty = tty
        self.every_s = 1.0 if tty else log_every_s
        self.stream = stream
        self.next_s = t0 + (0.0 if tty else log_every_s)
        self.width = 0

    def tick(self, now: float, force: bool = False) -> None:
        if not force and now < self.next_s:
            return
        self.next_s = now + self.every_s
        done = self.source()
        line = progress_line(done, self.total, now - self.t0)
        if self.tty:
            bar = ""
            if self.total:
                filled = int(min(1.0, max(0.0, done / self.total)) * 20)
                bar = "[" + "#" * filled + "." * (20 - filled) + "] "
            text = bar + line.removeprefix("progress: ")
            pad = " " * max(0, self.width - len(text))
            self.width = len(text)
            self.stream.write("\r" + text + pad)
            self.stream.flush()
        else:
            logger.info(line)

    def close(self, now: float) -> None:
        self.tick(now, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@rank_zero_only
def _warn_rank_zero(message: str) -> None:
    logger.warning(message)


class RunMonitor(Callback):
    r"""Per-rank GPU/host sampling, batch timing, whole-job progress and a report part per rank.

    Metrics (see the module docstring for the part schema): NVML device memory used/total
    (bytes) and utilisation (% of time a kernel ran, the real busy share, not the memory
    fraction), torch.cuda allocated/reserved/max allocated (bytes), host RSS (bytes), data wait,
    compute and stage times (s), batches, tiles, tiles/s.

    Without a GPU or without NVML it logs one warning and samples host RSS (plus torch.cuda
    memory when on CUDA); NVML errors during the run are warned about once and never stop it.

    Args:
        run_dir: run directory (identical on all ranks); parts go to ``run_dir/report_parts``.
        interval_s: sampling interval, seconds (> 0). 0.5 s costs well under 1 % of a core.
        backend: NVML backend to use (tests pass a fake); None opens NVML on CUDA ranks.
        total_tiles: tiles of the WHOLE job (all ranks) for progress %/ETA; None = unknown.
        progress: True: a single ``\r`` line on rank 0 when stderr is a TTY (plain log lines
            otherwise); False: a log line every ``log_every_s`` (batch jobs).
        log_every_s: seconds between progress log lines (> 0).
        progress_source: returns tiles done by ALL ranks so far (e.g. rows in every rank's
            shard); called on rank 0 from the sampling thread, at most once per second (TTY) or
            per ``log_every_s``. None: estimate as rank-0 tiles * world_size. No collective is
            ever used inside predict.
        sync_cuda: synchronise the device at each batch end so compute_s includes queued
            kernels (CUDA is asynchronous). Costs a little overlap; False measures host time only.
        max_samples: cap of the kept sample series per rank.
        env: environment for ``CUDA_VISIBLE_DEVICES`` (default ``os.environ``).
        stream: where the TTY bar goes (default ``sys.stderr``).
    """

    def __init__(
        self,
        run_dir: Path,
        interval_s: float = 0.5,
        backend: GpuBackend | None = None,
        total_tiles: int | None = None,
        progress: bool = True,
        log_every_s: float = 30.0,
        progress_source: Callable[[], int] | None = None,
        *,
        sync_cuda: bool = True,
        max_samples: int = MAX_SAMPLES,
        env: Mapping[str, str] | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"monitor interval_s must be > 0 seconds, got {interval_s}")
        if not log_every_s > 0:
            raise ConfigError(f"progress log_every_s must be > 0 seconds, got {log_every_s}")
        if total_tiles is not None and total_tiles < 0:
            raise ConfigError(f"total_tiles must be >= 0 or None, got {total_tiles}")
        self.run_dir = Path(run_dir)
        self.interval_s = float(interval_s)
        self.backend = backend
        self.total_tiles = total_tiles
        self.progress = progress
        self.log_every_s = float(log_every_s)
        self.progress_source = progress_source
        self.sync_cuda = sync_cuda
        self.max_samples = max_samples
        self.env = env
        self.stream = stream
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._reset()
        self._ranks: dict[str, int] = {}

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self.t0: float | None = None
        self.batches = 0
        self.tiles = 0
        self.data_wait_s = 0.0
        self.compute_s = 0.0
        self.stages_s: dict[str, float] = defaultdict(float)
        self.stages_background_s: dict[str, float] = defaultdict(float)
        self._last_end = 0.0
        self._first_batch_end: float | None = None  # clock time the first batch finished
        self._first_batch_tiles = 0
        self._batch_start: float | None = None
        self._stage_in_window = 0.0  # blocking stage time since the last batch start / end
        self._main_thread = threading.get_ident()
        self._sampler: DeviceSampler | None = None
        self._progress: _Progress | None = None
        self._gpu: GpuInfo | None = None
        self._selector: GpuSelector | None = None
        self._device = "cpu"
        self._cuda_index: int | None = None
        self._source = "host"
        self._own_backend: Any = None
        self._finalised = False
        self._wall_s: float | None = None
        self.predict_start_unix_s: float | None = None
        self.first_batch_unix_s: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings only (``ddp_spawn`` sends callbacks to each rank); runtime state drops.

        An NVML backend and a non-default stream are dropped too (each rank opens its own);
        ``progress_source`` must then be picklable (a module-level function or a partial).
        """
        keep = (
            "run_dir", "interval_s", "total_tiles", "progress", "log_every_s",
            "progress_source", "sync_cuda", "max_samples", "env", "_clock",
        )  # fmt: skip
        state = {k: self.__dict__[k] for k in keep}
        state["env"] = None if self.env is None else dict(self.env)
        state["backend"] = None if isinstance(self.backend, NvmlBackend) else self.backend
        state["stream"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._ranks = {}
        self._reset()

    @property
    def part_path(self) -> Path:
        """This rank's report part, ``run_dir/report_parts/rank{global_rank}.json``."""
        return self.run_dir / "report_parts" / f"rank{self._ranks.get('global_rank', 0)}.json"

    # ------------------------------------------------------------ stage API
    def record_stage(self, name: str, seconds: float) -> None:
        """Add ``seconds`` of work named ``name`` (e.g. ``"postprocess"``, ``"write"``).

        Call it from the rank's main thread (the LightningModule or the writer callback) for
        time that blocked the predict loop: inside a batch it is moved out of compute_s, between
        batches out of data_wait_s. From any other thread (a background writer) it is recorded
        under ``stages_background_s`` (overlapped time, not part of the wall-time partition).

        Args:
            name: stage name; ``"write"`` and ``"postprocess"`` are used by the bottleneck hint.
            seconds: duration, seconds (>= 0; negative values are ignored).
        """
        if not seconds > 0:
            return
        with self._lock:
            if threading.get_ident() == self._main_thread:
                self.stages_s[name] += seconds
                self._stage_in_window += seconds
            else:
                self.stages_background_s[name] += seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body and :meth:`record_stage` it under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record_stage(name, time.perf_counter() - start)

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Record the rank layout and create ``run_dir/report_parts``."""
        self._ranks = {
            "global_rank": int(trainer.global_rank),
            "local_rank": int(trainer.local_rank),
            "node_rank": int(trainer.node_rank),
            "world_size": int(trainer.world_size),
        }
        try:
            (self.run_dir / "report_parts").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from mgpr.errors import OutputError

            raise OutputError(
                f"cannot create {self.run_dir / 'report_parts'} for the run report: {exc}; "
                "set output_dir to a writable shared directory"
            ) from exc

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start timing and the sampling thread (and the progress display on rank 0)."""
        self._reset()
        if not self._ranks:
            self.setup(trainer, pl_module, "predict")
        self.t0 = self._clock()
        self.predict_start_unix_s = time.time()
        self._last_end = self.t0
        self._open_device(trainer)
        on_tick = None
        if trainer.is_global_zero:
            stream = self.stream if self.stream is not None else sys.stderr
            tty = bool(self.progress) and _isatty(stream)
            world = max(1, self._ranks["world_size"])
            source = self.progress_source or (lambda: self.tiles * world)
            self._progress = _Progress(
                t0=self.t0,
                total=self.total_tiles,
                source=self._safe_source(source),
                tty=tty,
                log_every_s=self.log_every_s,
                stream=stream,
            )
            on_tick = self._progress.tick
        self._sampler = DeviceSampler(
            gpu=self._gpu,
            backend=self.backend or self._own_backend,
            torch_device_index=self._cuda_index,
            interval_s=self.interval_s,
            t0=self.t0,
            max_samples=self.max_samples,
            clock=self._clock,
            on_tick=on_tick,
            log_prefix=rank_prefixed_message("", self._ranks["global_rank"]),
        )
        self._sampler.start()

    def on_predict_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Close the data-wait interval of this batch and open its compute interval."""
        now = self._clock()
        if self.first_batch_unix_s is None:
            self.first_batch_unix_s = time.time()
        with self._lock:
            gap = now - self._last_end - self._stage_in_window
            self.data_wait_s += max(0.0, gap)
            self._stage_in_window = 0.0
            self._batch_start = now

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Close the compute interval (after a CUDA sync) and count the batch's tiles."""
        if self._cuda_index is not None and self.sync_cuda:
            torch.cuda.synchronize(self._cuda_index)
        now = self._clock()
        n = _batch_len(batch)
        with self._lock:
            start = self._batch_start if self._batch_start is not None else self._last_end
            self.compute_s += max(0.0, now - start - self._stage_in_window)
            self._stage_in_window = 0.0
            self._batch_start = None
            self._last_end = now
            if self._first_batch_end is None:
                self._first_batch_end, self._first_batch_tiles = now, n
            self.batches += 1
            self.tiles += n

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop sampling and write this rank's report part (status ``finished``)."""
        self._finish("finished", None)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Stop sampling and write this rank's report part (status ``failed``)."""
        if self._ranks and not self._finalised:
            self._finish("failed", f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Release the thread and NVML; write an empty part for a rank that predicted nothing.

        Lightning skips on_predict_start/on_predict_end when a rank's DataLoader is empty (a
        rank with no tiles is allowed); its part then says 0 batches instead of "missing".
        """
        if stage == "predict" and self._ranks and not self._finalised:
            self._finish("finished", None)
        self._stop_sampler()

    # -------------------------------------------------------------- helpers
    def _safe_source(self, source: Callable[[], int]) -> Callable[[], int]:
        world = max(1, self._ranks.get("world_size", 1))
        warned = False

        def call() -> int:
            nonlocal warned
            try:
                return int(source())
            except Exception as exc:  # noqa: BLE001 - progress must never stop a run
                if not warned:
                    warned = True
                    logger.warning(
                        "progress_source failed (%s); estimating as rank-0 tiles x %d ranks",
                        exc,
                        world,
                    )
                return self.tiles * world

        return call

    def _open_device(self, trainer: Trainer) -> None:
        rank = self._ranks["global_rank"]
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self._device = str(device)
            self._source = "host"
            _warn_rank_zero(NO_GPU_MESSAGE)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._device, self._cuda_index, self._source = f"cuda:{index}", index, "torch"
        backend = self.backend
        if backend is None:
            backend, reason = open_nvml_backend()
            self._own_backend = backend
            if backend is None:
                logger.warning(
                    rank_prefixed_message(
                        f"NVML unavailable ({reason}): reporting torch.cuda memory, host RSS and "
                        "timing; no GPU utilisation",
                        rank,
                    )
                )
                return
        try:
            self._selector = _selector_for(index, self.env if self.env is not None else os.environ)
            self._gpu = resolve_gpu(self._selector, backend)
        except Exception as exc:  # noqa: BLE001 - never crash the run over monitoring
            logger.warning(
                rank_prefixed_message(
                    f"cannot find cuda:{index} in NVML ({exc}); reporting torch.cuda memory only",
                    rank,
                )
            )
            self._gpu = None
            return
        self._source = "nvml-mig" if self._gpu.mig else "nvml"
        if self._gpu.mig:
            logger.warning(
                rank_prefixed_message(
                    f"cuda:{index} is a MIG instance ({self._gpu.uuid}); NVML reports no "
                    "utilisation for MIG, reporting memory only",
                    rank,
                )
            )

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        if self._own_backend is not None:
            self._own_backend.close()
            self._own_backend = None

    def _finish(self, status: str, error: str | None) -> None:
        if self._finalised:
            return
        self._finalised = True
        now = self._clock()
        sampler = self._sampler
        if sampler is not None:
            sampler.stop()
            sampler.sample_once()  # a final reading, so even a short run has one
        if self._progress is not None:
            try:
                self._progress.close(now)
            except Exception:  # noqa: BLE001
                pass
        self._wall_s = 0.0 if self.t0 is None else now - self.t0
        payload = self.part(status, error)
        self._stop_sampler()
        try:
            write_json_atomic(self.part_path, payload)
        except OSError as exc:
            logger.warning(
                rank_prefixed_message(
                    f"cannot write report part {self.part_path}: {exc}",
                    self._ranks.get("global_rank", 0),
                )
            )

    def part(self, status: str = "running", error: str | None = None) -> dict[str, Any]:
        """This rank's report part as a dict (schema in the module docstring)."""
        wall = (
            self._wall_s
            if self._wall_s is not None
            else (0.0 if self.t0 is None else self._clock() - self.t0)
        )
        gpu = None
        if self._gpu is not None:
            gpu = {
                "name": self._gpu.name,
                "uuid": self._gpu.uuid,
                "physical_index": self._gpu.physical_index,
                "memory_total_bytes": int(self._gpu.memory_total_bytes),
                "mig": self._gpu.mig,
                "selector_source": self._selector.source if self._selector else None,
            }
        elif self._cuda_index is not None:
            props = _cuda_props(self._cuda_index)
            if props is not None:
                gpu = {
                    "name": props[0],
                    "uuid": props[1],
                    "physical_index": None,
                    "memory_total_bytes": props[2],
                    "mig": False,
                    "selector_source": "torch",
                }
        sampler = self._sampler
        with self._lock:
            stages = {k: float(v) for k, v in self.stages_s.items()}
            background = {k: float(v) for k, v in self.stages_background_s.items()}
            batches, tiles = self.batches, self.tiles
            data_wait, compute = self.data_wait_s, self.compute_s
            first_end, first_tiles = self._first_batch_end, self._first_batch_tiles
        steady = None
        if first_end is not None and self.t0 is not None:
            span = self.t0 + wall - first_end
            if tiles > first_tiles and span > 0:
                steady = (tiles - first_tiles) / span
        return {
            "schema": PART_SCHEMA,
            "status": status,
            "error": error,
            "hostname": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            **self._ranks,
            "device": self._device,
            "monitor_source": self._source,
            "gpu": gpu,
            "host_memory_total_bytes": _host_memory_total(),
            "interval_s": self.interval_s,
            "wall_s": float(wall),
            "data_wait_s": float(data_wait),
            "compute_s": float(compute),
            "stages_s": stages,
            "stages_background_s": background,
            "batches": batches,
            "tiles": tiles,
            "tiles_per_s": tiles / wall if wall > 0 else 0.0,
            "steady_tiles_per_s": steady,
            "predict_start_unix_s": self.predict_start_unix_s,
            "first_batch_unix_s": self.first_batch_unix_s,
            "cuda_synchronized": self._cuda_index is not None and self.sync_cuda,
            "stats": sampler.buffer.stats() if sampler is not None else {"samples": 0},
            "samples": sampler.buffer.columns() if sampler is not None else {},
        }


def _selector_for(index: int, env: Mapping[str, str]) -> GpuSelector:
    """Prefer the uuid torch reports for ``cuda:index`` (exact); else map CUDA_VISIBLE_DEVICES."""
    env_selector = physical_gpu_for_local_device(index, env)
    if env_selector.mig:
        return env_selector
    props = _cuda_props(index)
    if props is not None and props[1].startswith("GPU-"):
        return GpuSelector(index, None, uuid=props[1], source="torch")
    return env_selector


def _cuda_props(index: int) -> tuple[str, str, int] | None:
    """(name, uuid with ``GPU-`` prefix, total memory bytes) from torch, or None."""
    try:
        props = torch.cuda.get_device_properties(index)
        uuid = str(props.uuid)
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        return str(props.name), uuid, int(props.total_memory)
    except Exception:  # noqa: BLE001
        return None


def _host_memory_total() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return None


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001
        return False


def find_run_monitor(trainer: Trainer) -> RunMonitor | None:
    """Return the trainer's :class:`RunMonitor` (for ``record_stage`` from a module), or None."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, RunMonitor):
            return callback
    return None
