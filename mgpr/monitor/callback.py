"""Run monitor: is the multi-GPU job using its GPUs, and is data loading holding it back?

:class:`RunMonitor` is a Lightning callback. On every rank it samples the rank's OWN GPU on a
daemon thread (found by the uuid of its local CUDA device, never by the global rank; see
:mod:`mgpr.monitor.nvml`), times every predict batch (data wait vs compute), takes the stage
times the module and the writer report (:meth:`RunMonitor.record_stage`), shows whole-job
progress on rank 0 (:mod:`mgpr.monitor.progress`), and at the end writes one report part per
rank. :func:`mgpr.monitor.report.build_report` (rank 0, once every rank is done) merges the
parts into ``report.json`` + ``report.png``.

Timing model, per rank (all seconds, monotonic clock)::

    t0          = when the predict DataLoader's iterator was created (the loader's
                  ``iter_started_s``, see :func:`fetch_started`), else on_predict_start.
                  Lightning's prefetching fetcher creates the iterator and fetches the first
                  batch in the predict loop's reset, BEFORE on_predict_start: a clock started
                  there missed worker start-up and the first batch (tiles/s above the loader's
                  ceiling).
    wall_s      = t0 -> on_predict_end
    data_wait_s = sum over batches of (on_predict_batch_start - end of previous batch, or
                  t0 for the first), minus stage time recorded in that gap. Includes the
                  DataLoader fetch, worker start-up and the first batch's read (from t0),
                  the host->device copy (Lightning moves the batch before
                  on_predict_batch_start) and, for the first batch, on_predict_start's own
                  set-up (NVML, the sampler thread: milliseconds).
    compute_s   = sum of (on_predict_batch_start -> on_predict_batch_end, after
                  torch.cuda.synchronize on CUDA so queued kernels are counted) minus stage
                  time recorded inside the batch.
    stages_s    = record_stage() totals from the main thread (blocking); time from other
                  threads goes to stages_background_s (overlapped, not part of the partition).
    other       = wall_s - data_wait_s - compute_s - sum(stages_s) (hooks, epoch end, tail).

The part each rank writes, and its schema, are in :mod:`mgpr.monitor.part`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer

from mgpr.errors import ConfigError, OutputError, RunInterrupted
from mgpr.monitor.nvml import GpuInfo, Nvml, open_nvml
from mgpr.monitor.part import (
    PART_SCHEMA,
    CudaProps,
    cuda_props,
    gpu_fields,
    host_memory_limit,
    host_memory_total,
    hostname,
)
from mgpr.monitor.progress import Progress, isatty
from mgpr.monitor.sampler import MAX_SAMPLES, DeviceSampler
from mgpr.outputs.rundir import write_json_atomic

logger = logging.getLogger(__name__)

#: The message logged once when a run has no GPU (or no NVML) to watch.
NO_GPU_MESSAGE = "no GPU/NVML: reporting host RSS and CPU timing"


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


def _model_len(batch: Any, tiles: int) -> int:
    """Tiles of a batch that reach the model: status OK (nodata and unreadable tiles skip it).

    Fake-data batches and other inputs without a ``status`` count every tile.
    """
    if isinstance(batch, Mapping) and "status" in batch:
        from mgpr.data.dataset import STATUS_OK

        return int(np.count_nonzero(np.asarray(batch["status"]) == STATUS_OK))
    return tiles


def fetch_started(trainer: Any, now: float) -> float | None:
    """Monotonic seconds the predict DataLoader's iterator was created, or None if unknown.

    Read from the loader's ``iter_started_s`` (:class:`~mgpr.data.batch_pool.TileLoader`
    stamps it in ``__iter__``); a stamp later than ``now`` (another clock) is ignored. With
    several predict loaders, the earliest.
    """
    loaders = getattr(trainer, "predict_dataloaders", None)
    if loaders is None:
        return None
    if not isinstance(loaders, list | tuple):
        loaders = [loaders]
    stamps = [
        float(t)
        for dl in loaders
        if isinstance(t := getattr(dl, "iter_started_s", None), int | float) and t <= now
    ]
    return min(stamps) if stamps else None


#: Batches after the first that a steady rate needs (one batch is a single interval).
STEADY_MIN_BATCHES = 2


def steady_rate(batches: int, tiles: int, first_tiles: int, span_s: float) -> float | None:
    """Tiles/s after the first batch (start-up left out), or None when that window is too thin.

    The window needs at least :data:`STEADY_MIN_BATCHES` batches and as many tiles as the first
    batch held (a 1-tile last batch alone is no rate: 0.555 tiles/s beside an overall 1.131).

    Args:
        batches: the rank's batches, the first included.
        tiles: the rank's tiles, the first batch's included.
        first_tiles: tiles of the first batch.
        span_s: seconds from the first batch's end to the loop's end.
    """
    after_batches, after_tiles = batches - 1, tiles - first_tiles
    if after_batches < STEADY_MIN_BATCHES or after_tiles < max(1, first_tiles) or span_s <= 0:
        return None
    return after_tiles / span_s


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
        nvml: an open NVML session to use (tests pass one over a fake module); None opens
            NVML on CUDA ranks (and closes it at the end).
        total_tiles: tiles of the WHOLE job (all ranks) for progress %/ETA; None = unknown.
        progress: True: a single ``\r`` line on rank 0 when stderr is a TTY (plain log lines
            otherwise); False: a log line every ``log_every_s`` (batch jobs).
        log_every_s: seconds between progress log lines (> 0).
        progress_source: returns tiles done by ALL ranks so far (the store's tally of
            every rank); called on rank 0 from the sampling thread, at most once per second (TTY) or
            per ``log_every_s``. None: estimate as rank-0 tiles * world_size. No collective is
            ever used inside predict.
        sync_cuda: synchronise the device at each batch end so compute_s includes queued
            kernels (CUDA is asynchronous). Costs a little overlap; False measures host time only.
        max_samples: cap of the kept sample series per rank.
        stream: where the TTY bar goes (default ``sys.stderr``).
    """

    def __init__(
        self,
        run_dir: Path,
        interval_s: float = 0.5,
        nvml: Nvml | None = None,
        total_tiles: int | None = None,
        progress: bool = True,
        log_every_s: float = 30.0,
        progress_source: Callable[[], int] | None = None,
        *,
        sync_cuda: bool = True,
        max_samples: int = MAX_SAMPLES,
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
        self.nvml = nvml
        self.total_tiles = total_tiles
        self.progress = progress
        self.log_every_s = float(log_every_s)
        self.progress_source = progress_source
        self.sync_cuda = sync_cuda
        self.max_samples = max_samples
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
        self.model_tiles = 0  # of ``tiles``, those that reached the model (status OK)
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
        self._progress: Progress | None = None
        self._gpu: GpuInfo | None = None
        self._cuda_props: CudaProps | None = None
        self._device = "cpu"
        self._cuda_index: int | None = None
        self._source = "host"
        self._own_nvml: Nvml | None = None
        self._finalised = False
        self._wall_s: float | None = None
        #: the module's :class:`~mgpr.data.clipping.ClipTally` (None: its values cannot clip)
        self._clip_tally: Any = None
        self.predict_start_unix_s: float | None = None
        self.first_batch_unix_s: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle settings only (``ddp_spawn`` sends callbacks to each rank); runtime state drops.

        An NVML session and a non-default stream are dropped too (each rank opens its own);
        ``progress_source`` must then be picklable (a module-level function or a partial).
        """
        keep = (
            "run_dir", "interval_s", "total_tiles", "progress", "log_every_s",
            "progress_source", "sync_cuda", "max_samples", "_clock",
        )  # fmt: skip
        state = {k: self.__dict__[k] for k in keep}
        state["nvml"] = None
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
            raise OutputError(
                f"cannot create {self.run_dir / 'report_parts'} for the run report: {exc}; "
                "set output_dir to a writable shared directory"
            ) from exc

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the sampling thread (and the progress display on rank 0); timing starts at t0.

        t0 is the DataLoader iterator's creation (before this hook: the first batch is already
        fetched), so the first batch's wait is data wait (module docstring).
        """
        self._reset()
        if not self._ranks:
            self.setup(trainer, pl_module, "predict")
        now = self._clock()
        started = fetch_started(trainer, now) if self._clock is time.monotonic else None
        self.t0 = now if started is None else started
        self.predict_start_unix_s = time.time() - (now - self.t0)
        self._clip_tally = getattr(pl_module, "clip_tally", None)
        self._last_end = self.t0
        self._open_device(trainer)
        on_tick = None
        if trainer.is_global_zero:
            stream = self.stream if self.stream is not None else sys.stderr
            tty = bool(self.progress) and isatty(stream)
            world = max(1, self._ranks["world_size"])
            source = self.progress_source or (lambda: self.tiles * world)
            self._progress = Progress(
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
            nvml=self.nvml or self._own_nvml,
            torch_device_index=self._cuda_index,
            interval_s=self.interval_s,
            t0=self.t0,
            max_samples=self.max_samples,
            clock=self._clock,
            on_tick=on_tick,
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
        model_n = _model_len(batch, n)
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
            self.model_tiles += model_n

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop sampling and write this rank's report part (status ``finished``)."""
        self._finish("finished", None)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Stop sampling and write this rank's report part: ``interrupted`` or ``failed``.

        A stop signal (preemption, scancel, Ctrl-C) is not a fault of the rank: its part says
        ``interrupted`` and the figures up to the stop stay a valid measurement.
        """
        if self._ranks and not self._finalised:
            status = "interrupted" if isinstance(exception, RunInterrupted) else "failed"
            self._finish(status, f"{type(exception).__name__}: {exception}")

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
        """Find this rank's device: NVML by the uuid torch reports for its local CUDA ordinal."""
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self._device = str(device)
            self._source = "host"
            _warn_rank_zero(NO_GPU_MESSAGE)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._device, self._cuda_index, self._source = f"cuda:{index}", index, "torch"
        self._cuda_props = cuda_props(index)
        nvml = self.nvml
        if nvml is None:
            nvml, reason = open_nvml()
            self._own_nvml = nvml
            if nvml is None:
                logger.warning(
                    f"NVML unavailable ({reason}): reporting torch.cuda memory, host RSS and "
                    "timing; no GPU utilisation"
                )
                return
        try:
            if self._cuda_props is None:
                raise RuntimeError("torch reports no uuid for it")
            self._gpu = nvml.gpu(self._cuda_props.uuid)
        except Exception as exc:  # noqa: BLE001 - never crash the run over monitoring
            logger.warning(
                f"cannot find cuda:{index} in NVML ({exc}); reporting torch.cuda memory only"
            )
            self._gpu = None
            return
        self._source = "nvml-mig" if self._gpu.mig else "nvml"
        if self._gpu.mig:
            logger.warning(
                f"cuda:{index} is a MIG instance ({self._gpu.uuid}); NVML reports no "
                "utilisation for MIG, reporting memory only"
            )

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        if self._own_nvml is not None:
            self._own_nvml.close()
            self._own_nvml = None

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
        payload["values_clipped"] = self._clipped()
        self._stop_sampler()
        wall = float(payload.get("wall_s") or 0.0)
        logger.info(  # every rank's log says how its part of the run went, not rank 0's alone
            "rank %s on %s (%s): %s, %d tiles in %.1f s, data wait %.1f s",
            payload.get("global_rank"),
            payload.get("hostname"),
            payload.get("device"),
            status,
            int(payload.get("tiles") or 0),
            wall,
            float(payload.get("data_wait_s") or 0.0),
            extra={"file_only": True},  # the console has the report's table
        )
        try:
            write_json_atomic(self.part_path, payload)
        except OSError as exc:
            logger.warning(f"cannot write report part {self.part_path}: {exc}")

    def final_progress(self) -> None:
        """Rank 0, once every rank is done: a last progress line with the whole job's count."""
        if self._progress is None:
            return
        try:
            self._progress.final(self._clock())
        except Exception:  # noqa: BLE001 - progress must never fail a finished run
            pass

    def _clipped(self) -> dict[str, int] | None:
        """The module's clip counts, read once at the end (None: none kept, or unreadable)."""
        if self._clip_tally is None:
            return None
        try:
            totals = self._clip_tally.totals()
            return None if totals is None else dict(totals)
        except Exception:  # noqa: BLE001  (a device that failed mid-run: the part still lands)
            return None

    def part(self, status: str = "running", error: str | None = None) -> dict[str, Any]:
        """This rank's report part as a dict (schema in :mod:`mgpr.monitor.part`)."""
        wall = (
            self._wall_s
            if self._wall_s is not None
            else (0.0 if self.t0 is None else self._clock() - self.t0)
        )
        gpu = gpu_fields(self._gpu, self._cuda_props)
        sampler = self._sampler
        with self._lock:
            stages = {k: float(v) for k, v in self.stages_s.items()}
            background = {k: float(v) for k, v in self.stages_background_s.items()}
            batches, tiles, model_tiles = self.batches, self.tiles, self.model_tiles
            data_wait, compute = self.data_wait_s, self.compute_s
            first_end, first_tiles = self._first_batch_end, self._first_batch_tiles
        steady = None
        if first_end is not None and self.t0 is not None:
            steady = steady_rate(batches, tiles, first_tiles, self.t0 + wall - first_end)
        limit = host_memory_limit()
        cgroup_limit = limit.bytes if limit is not None and limit.source == "cgroup" else None
        return {
            "schema": PART_SCHEMA,
            "status": status,
            "error": error,
            "hostname": hostname(),
            **self._ranks,
            "device": self._device,
            "monitor_source": self._source,
            "gpu": gpu,
            "host_memory_total_bytes": host_memory_total(),
            "host_memory_limit_bytes": cgroup_limit,
            "interval_s": self.interval_s,
            "wall_s": float(wall),
            "data_wait_s": float(data_wait),
            "compute_s": float(compute),
            "stages_s": stages,
            "stages_background_s": background,
            "batches": batches,
            "tiles": tiles,
            "tiles_per_s": tiles / wall if wall > 0 else 0.0,
            "model_tiles": model_tiles,
            "model_tiles_per_s": model_tiles / wall if wall > 0 else 0.0,
            "steady_tiles_per_s": steady,
            "predict_start_unix_s": self.predict_start_unix_s,
            "first_batch_unix_s": self.first_batch_unix_s,
            "cuda_synchronized": self._cuda_index is not None and self.sync_cuda,
            "stats": sampler.buffer.stats() if sampler is not None else {"samples": 0},
            "samples": sampler.buffer.columns() if sampler is not None else {},
        }
