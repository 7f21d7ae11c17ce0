"""Lightning wiring: DataModule, Trainer and the end of predict, on one rank.

Distribution is Lightning's (DDP, SLURMEnvironment, ``num_nodes``); the assignment of tiles is
ours (``use_distributed_sampler=False``): rank 0 decides which tiles of the plan are left (the
plan minus what an earlier run of the same job finished) and tells the others through the
process group's store, and each rank then claims small chunks of that list as it goes
(:mod:`mgpr.run.claims`), so ranks finish together whatever the nodata or their speed. The
decision happens in :meth:`TileDataModule.setup`, i.e. after the process group exists, so rank 0
never reads the run directory while it is still clearing it (``overwrite``).

After predict no collective runs: ranks publish ``done`` keys and rank 0 waits for them as long
as every missing rank is alive (:mod:`mgpr.run.liveness`); the process group is gloo even on
GPUs (mgpr has no tensor collectives), so no NCCL watchdog can end a run.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mgpr.conf.schema import PredictConfig
from mgpr.data.batch_pool import PREFETCH_FACTOR, TileLoader
from mgpr.data.batching import UniformShapeBatchSampler
from mgpr.data.dataset import FakeTileDataset, TileDataset, collate_tiles
from mgpr.data.pinned import CudaHostRegistrar, HostRegistrar, host_memory_plan
from mgpr.data.scaling import ValueScaler
from mgpr.errors import ConfigError, RankFailedError, RunInterrupted
from mgpr.geo.raster import RasterInfo, TileReader
from mgpr.geo.tiling import Tile
from mgpr.geo.values import ValueRange, carrier_dtype
from mgpr.monitor.callback import RunMonitor
from mgpr.monitor.profiler import make_profiler
from mgpr.outputs.parts_read import DAMAGED_DIR, finished_tile_keys, set_aside_damaged_parts
from mgpr.outputs.rundir import rerun
from mgpr.run.accel import resolve_compile
from mgpr.run.claims import (
    CHUNK_BATCHES,
    ChunkClaimBatchSampler,
    LocalCounter,
    StoreCounter,
    default_store,
    share_remaining,
    static_split_requested,
)
from mgpr.run.liveness import (
    STOP_GRACE_S,
    Heartbeat,
    LocalRanks,
    StoreTally,
    end_of_predict,
    publish_done,
)
from mgpr.run.merge_share import merge_share
from mgpr.run.module import InferenceModule
from mgpr.run.writer_callback import PredictionPartWriter
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext

log = logging.getLogger(__name__)

TEST_TILE_DELAY_ENV = "MGPR_TEST_TILE_DELAY_RANK{rank}"
"""Test-only: seconds of extra sleep per read tile on that global rank (a slower rank, for the
balance tests and ``benchmarks/balance.py``). Not a user option."""


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (TPU, tips, srun hints) out of the user's log.

    Lightning configures its loggers when it is imported, so this runs after that import.
    """
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    warnings.filterwarnings("ignore", message=".*srun. command is available.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1/SIGINT to the rank's main process.

    ``srun --signal=USR1`` and ``scancel`` signal every process of the step, workers included;
    a forked worker would otherwise run the main process's handler and die mid-batch. A batch
    handed over as the rank stops is no fault of the worker's: no traceback for it.
    """
    import signal

    from mgpr.run.children import quiet_fd_handover_races

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    quiet_fd_handover_races()


class KeepStopHandler(pl.Callback):
    """Put the caller's SIGTERM handler (mgpr's clean stop) back over Lightning's own.

    Lightning registers a SIGTERM handler just before predict that broadcasts a flag to every
    rank from inside the handler: a rank signalled alone (``kill`` of one task) would block in
    that collective for ``join_timeout_s``. SLURM signals every task of the step, and mgpr's
    handler stops each rank on its own, keeping the parts published so far.
    """

    def __init__(self) -> None:
        import signal

        self.handler = signal.getsignal(signal.SIGTERM)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reinstall the handler that was active when the Trainer was built (if any)."""
        import signal
        import threading

        if callable(self.handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)


class TileDataModule(pl.LightningDataModule):
    """Builds this rank's DataLoader once the global rank and world size are known.

    Args:
        local_ranks: rank 0's supervisor of the child ranks Lightning launches (adopted here).
        tally: the whole run's count of predicted tiles (progress), in the store.
        on_remaining: called with the number of tiles this run predicts (progress total).
    """

    def __init__(
        self,
        cfg: PredictConfig,
        tiles: Sequence[Tile],
        rasters: Sequence[RasterInfo],
        bands: dict[str, list[int]],
        run_dir: Path,
        pin_memory: bool,
        fake_bands: int,
        local_ranks: LocalRanks | None = None,
        tally: StoreTally | None = None,
        on_remaining: Callable[[int], None] | None = None,
    ) -> None:
        """``pin_memory``: the rank copies batches to a GPU (pinned pool or pin copy)."""
        super().__init__()
        self.cfg = cfg
        self.all_tiles = list(tiles)
        self.rasters = list(rasters)
        self.bands = bands
        self.run_dir = run_dir
        self.pin_memory = pin_memory
        self.fake_bands = fake_bands
        self.local_ranks = local_ranks
        self.tally = tally
        self.on_remaining = on_remaining
        self.remaining_tiles: list[Tile] = []
        self.skipped_done = 0
        self.sampler: ChunkClaimBatchSampler | None = None
        self.n_items = 0
        self.store: Any = None
        self.heartbeat: Heartbeat | None = None

    def setup(self, stage: str) -> None:
        """Learn the tiles left (rank 0 decides), start claiming and the heartbeat."""
        rank = self.trainer.global_rank
        if self.local_ranks is not None:
            self.local_ranks.adopt(getattr(self.trainer.strategy, "launcher", None), rank)
            self.local_ranks.started()  # every rank joined the process group
        self.store = default_store()
        cfg = self.cfg
        if cfg.use_fake_data:
            n_items = cfg.dummy_dataset_count
        else:
            keys = [t.id.key() for t in self.all_tiles]
            positions, self.skipped_done = share_remaining(
                keys, rank, self.store, lambda: _checked_finished_keys(self.run_dir)
            )
            self.remaining_tiles = [self.all_tiles[i] for i in positions]
            n_items = len(positions)
            if self.skipped_done and rank == 0:
                log.info(
                    "%d of the %d planned tiles were finished by an earlier run; %d left",
                    self.skipped_done,
                    len(keys),
                    n_items,
                )
            module = self.trainer.lightning_module
            assert isinstance(module, InferenceModule)
            module.tiles = self.remaining_tiles
        if self.on_remaining is not None:
            self.on_remaining(n_items)
        self.n_items = n_items
        if self.store is not None:
            if self.tally is not None:
                self.tally.attach(self.store)
            if self.heartbeat is None and rank != 0:  # rank 0 hosts the store: no one waits on it
                self.heartbeat = Heartbeat(self.store, rank)

    def stop_heartbeat(self) -> None:
        """Stop this rank's heartbeat thread (idempotent)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def predict_dataloader(self) -> DataLoader[Any]:
        """One DataLoader per rank; workers fork (Linux) and open rasters lazily.

        Its batch sampler claims chunks of the remaining tiles (in this, the main, process) and
        cuts them into batches that never mix band counts.
        """
        cfg = self.cfg
        dataset: Any
        keys: list[int] | None = None
        if cfg.use_fake_data:
            dataset = FakeTileDataset(
                cfg.dummy_dataset_count,
                cfg.tile_size,
                self.fake_bands,
                cfg.dummy_dataset_delay,
                cfg.seed,
            )
        else:
            carrier = carrier_dtype((r.path, r.dtype) for r in self.rasters)
            grids = {r.path: g for r in self.rasters if (g := r.model_grid) is not None}
            reader = TileReader(self.bands, cfg.tile_size, carrier.name, grids=grids)
            masked = {r.path for r in self.rasters if r.has_mask}
            delay = os.environ.get(TEST_TILE_DELAY_ENV.format(rank=self.trainer.global_rank))
            dataset = TileDataset(
                self.remaining_tiles, reader, masked, test_delay_s=float(delay or 0.0)
            )
            dataset.ranks_per_node = max(1, int(self.trainer.num_devices))
            keys = dataset.shape_keys()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        counter = StoreCounter(self.store) if self.store is not None else LocalCounter()
        self.sampler = ChunkClaimBatchSampler(
            self.n_items,
            cfg.batch_size,
            counter,
            chunk_batches=CHUNK_BATCHES,
            keys=keys,
            static_slice=(rank, world) if static_split_requested(os.environ) else None,
        )
        plan = host_memory_plan(self.pin_memory, cfg.workers, hasattr(dataset, "batch_pool"))
        return make_dataloader(
            dataset,
            cfg.batch_size,
            cfg.workers,
            plan.loader_pin_memory,
            CudaHostRegistrar() if plan.register_pool else None,
            batch_sampler=self.sampler,
        )


def make_dataloader(
    dataset: Any,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    host_registrar: HostRegistrar | None = None,
    batch_sampler: Any = None,
) -> DataLoader[Any]:
    """The DataLoader every rank uses (also what ``benchmarks/pipeline.py`` times).

    Workers fork on Linux (spawn re-imports torch + Lightning, seconds per worker) and open
    rasters lazily; each keeps ``prefetch_factor`` batches ready. :func:`collate_tiles` passes
    the batches :class:`TileDataset` decodes straight into shared memory through uncopied;
    :class:`~mgpr.data.batch_pool.TileLoader` lets the workers reuse those shared buffers once the
    main process is done with them. With ``host_registrar`` (GPU runs) those buffers are
    registered as pinned memory once (:mod:`mgpr.data.pinned`) and ``pin_memory`` is False.
    ``batch_sampler`` (a run's :class:`~mgpr.run.claims.ChunkClaimBatchSampler`) picks the
    batches in the main process; without one the dataset is read in order.
    """
    kwargs: dict[str, Any] = {}
    shape_keys = getattr(dataset, "shape_keys", None)
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    elif callable(shape_keys):
        # Batches never mix band counts (several rasters, band-agnostic model).
        kwargs["batch_sampler"] = UniformShapeBatchSampler(shape_keys(), batch_size)
    else:
        kwargs["batch_size"] = batch_size
        kwargs["shuffle"] = False
    if workers > 0:
        kwargs["worker_init_fn"] = ignore_stop_signals
        kwargs["prefetch_factor"] = PREFETCH_FACTOR
        kwargs["persistent_workers"] = False
        if sys.platform.startswith("linux"):
            kwargs["multiprocessing_context"] = "fork"
    return TileLoader(
        dataset,
        collate_fn=collate_tiles,
        num_workers=workers,
        pin_memory=pin_memory,
        host_registrar=host_registrar,
        **kwargs,
    )


def _node_index(slurm_task: Any) -> int:
    """This node's index in a multi-node run: the srun task's node id, else NODE_RANK."""
    if slurm_task is not None:
        return int(slurm_task.nodeid)
    for name in ("NODE_RANK", "GROUP_RANK"):  # by hand / torchrun
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _strategy(cfg: PredictConfig, world_size: int, under_srun: bool) -> Any:
    """DDP whenever more than one rank exists or ``srun`` started us; never single-device there.

    The process group is gloo even on GPUs: mgpr runs no tensor collective (DDP wraps no model
    for predict), only Lightning's start-up barriers and the store, and a gloo group has no NCCL
    watchdog to abort a run whose ranks wait on each other.
    """
    if cfg.strategy == "single_device":
        if world_size > 1 or under_srun:
            raise ConfigError(
                f"strategy=single_device runs one rank, but this run has {world_size} "
                f"rank(s){' under srun' if under_srun else ''}; use strategy=auto or ddp"
            )
        return "single_device"
    if world_size > 1 or under_srun or cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            timeout=dt.timedelta(seconds=cfg.join_timeout_s),
            process_group_backend="gloo",
        )
    return "auto"


def run_predict(
    cfg: PredictConfig,
    *,
    run_dir: Path,
    adapter: Any,
    rasters: Sequence[RasterInfo],
    tiles: Sequence[Tile],
    bands: dict[str, list[int]],
    accelerator: str,
    devices: int,
    num_nodes: int,
    precision: str,
    slurm_task: Any,
    value_ranges: dict[str, ValueRange] | None = None,
) -> dict[str, Any]:
    """Predict this rank's tiles; returns per-rank figures (and ``global_rank``).

    ``value_ranges``: each raster's :class:`~mgpr.geo.values.ValueRange` (None: fake data, or
    an adapter that takes raw values).
    """
    quiet_lightning()
    world_guess = devices * num_nodes
    under_srun = slurm_task is not None
    total = cfg.dummy_dataset_count if cfg.use_fake_data else len(tiles)
    tally = StoreTally()  # this run's tiles only: a resume's earlier tiles are not progress
    monitor = RunMonitor(
        run_dir,
        interval_s=0.5,
        total_tiles=total,
        progress=cfg.progress,
        progress_source=tally.total,
    )
    callbacks: list[Any] = [monitor, KeepStopHandler(), tally]
    if not cfg.use_fake_data:
        writer = PredictionPartWriter(
            run_dir,
            get_task(adapter.task),
            TaskContext.for_run(cfg, rasters, adapter.categories),
            on_write=lambda s, n: monitor.record_stage("write", s),
        )
        callbacks.append(writer)
    plugins: list[Any] = []
    if under_srun:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        # Explicit, so a job named "bash" still counts as SLURM; mgpr handles USR1 itself
        # (requeue + clean stop), so Lightning's own requeue handler stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        plugins=plugins or None,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(cfg, world_guess, under_srun),
        precision=precision,  # type: ignore[arg-type]
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=True,
        profiler=make_profiler(
            cfg.profiler, run_dir, _node_index(slurm_task) if num_nodes > 1 else None
        ),
        default_root_dir=str(run_dir),
    )
    compile_plan = resolve_compile(cfg.compile, accelerator, total, world_guess, cfg.batch_size)
    module = InferenceModule(
        adapter,
        None if cfg.use_fake_data else [],
        cfg.tile_size,
        on_stage=monitor.record_stage,
        compile_plan=compile_plan,
        batch_size=cfg.batch_size,
        scaler=ValueScaler(value_ranges, raw=adapter.input_range == "raw"),
        max_detections=cfg.max_detections,
        tta=cfg.tta,
        nms_iou=cfg.nms_iou,
        tta_fusion=cfg.tta_fusion,
    )
    fake_bands = adapter.in_bands or 3
    local_ranks = LocalRanks()
    local_ranks.adopt_at_launch(getattr(trainer.strategy, "launcher", None), run_dir)

    def set_total(n: int) -> None:
        monitor.total_tiles = n

    datamodule = TileDataModule(
        cfg,
        tiles,
        rasters,
        bands,
        run_dir,
        pin_memory=accelerator == "gpu",
        fake_bands=fake_bands,
        local_ranks=local_ranks,
        tally=tally,
        on_remaining=set_total,
    )
    t0 = time.time()
    finished = False
    stopped_by: str | None = None  # the stop signal's name, when one ended predict
    try:
        _predict(trainer, module, datamodule, cfg, run_dir)
        wall = time.time() - t0
        if trainer.world_size > 1 and datamodule.store is not None:
            end_of_predict(
                trainer.global_rank,
                trainer.world_size,
                datamodule.store,
                local_ranks,
                datamodule.stop_heartbeat,
                run_dir,
                finalise=None
                if cfg.use_fake_data
                else merge_share(cfg, run_dir, adapter, rasters, tiles, trainer.world_size),
                on_all_done=monitor.final_progress,
            )
        finished = True
    except RankFailedError:
        if trainer.global_rank == 0:
            _report_without(run_dir, trainer.world_size, cfg, str(trainer.precision), rasters)
        raise
    except RunInterrupted as exc:
        stopped_by = str(exc)
        raise
    finally:
        datamodule.stop_heartbeat()
        if not finished:
            # Stopped (SIGTERM, Ctrl-C) or failed: no local rank may outlive this process.
            killed = local_ranks.stop()
            if killed:
                log.warning("killed local rank process(es) %s after %.0f s", killed, STOP_GRACE_S)
        if stopped_by is not None and trainer.global_rank == 0:
            # Preempted or cancelled: how the run went until the stop, for the figures
            # are real; launched ranks are stopped above, srun's tasks are waited for.
            _report_without(
                run_dir,
                trainer.world_size,
                cfg,
                str(trainer.precision),
                rasters,
                unfinished=(
                    f"interrupted by {stopped_by}: no merge ran; the figures cover the predict "
                    "loop up to the stop, and a resume predicts the tiles left"
                ),
                wait_s=INTERRUPTED_PARTS_WAIT_S if under_srun else 0.0,
            )
    sampler = datamodule.sampler
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "tiles_this_rank": sampler.claimed_tiles if sampler is not None else 0,
        "chunks_this_rank": sampler.claimed_chunks if sampler is not None else 0,
        "skipped_done": datamodule.skipped_done,
        "merge_spread": trainer.world_size > 1 and not cfg.use_fake_data,
        "predict_wall_s": wall,
        "strategy": type(trainer.strategy).__name__,
        "pid": os.getpid(),
        "compile": module.compile_outcome.as_dict() if module.compile_outcome else None,
    }


#: Lightning's notices about choices mgpr makes on purpose, printed on every run and read by
#: users as faults: the claim sampler returns every index it is given (its own tests prove
#: it: nothing dropped), and transfer_batch_to_device is the module's on purpose (only images
#: and masks move to the device).
LIGHTNING_NOTICES = (
    r"You are using a custom batch sampler `ChunkClaimBatchSampler` for prediction",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
    r"`LightningDataModule`",
)


def _checked_finished_keys(run_dir: Path) -> set[str]:
    """Rank 0: the finished tiles, once parts that cannot be read are set aside (said once).

    A damaged part's tiles are then predicted again instead of every resume failing on it.
    """
    damaged = set_aside_damaged_parts(run_dir)
    if damaged:
        name, problem, _rows = damaged[0]
        rows = sum(r for _, _, r in damaged)
        more = f" (and {len(damaged) - 1} more part(s))" if len(damaged) > 1 else ""
        log.warning(
            "set aside %d damaged part(s) into %s/parts/%s: part %s: %s%s; their %d tile "
            "row(s) are predicted again",
            len(damaged),
            run_dir,
            DAMAGED_DIR,
            name,
            problem,
            more,
            rows,
        )
    return finished_tile_keys(run_dir)


#: Seconds rank 0 of a stopped srun step waits for the other tasks' report parts: they are
#: signalled at the same moment and write their part as they stop, well inside SLURM's
#: KillWait (30 s by default) before the step is killed.
INTERRUPTED_PARTS_WAIT_S = 5.0


def _report_without(
    run_dir: Path,
    world_size: int,
    cfg: PredictConfig,
    precision: str,
    rasters: Sequence[RasterInfo] = (),
    unfinished: str = "a rank did not finish: no merge ran",
    wait_s: float = 0.0,
) -> None:
    """Write report.json of a run that did not finish: a rank failed, or the run was stopped.

    Every part there is, the dead rank(s) in ``missing_ranks``: the figures of the ranks that
    worked are not lost with the merge that does not run. ``wait_s``: seconds to wait for the
    parts of ranks that are still stopping (srun tasks).
    """
    from mgpr.monitor.report import build_report, wait_for_parts
    from mgpr.run.finish import report_context

    context = {**report_context(cfg, precision, rasters), "unfinished": unfinished}
    try:
        if wait_s > 0:
            wait_for_parts(run_dir, world_size, wait_s)
        report = build_report(run_dir, world_size, context)
    except Exception as exc:  # noqa: BLE001 - the report must never hide the failure's line
        log.warning("could not build the run report: %s", exc)
        return
    log.info("report.json written: missing_ranks %s", report.get("missing_ranks"))


#: What a rank's join says when rank 0's store went away (not a timeout).
LOST_STORE = ("Broken pipe", "Connection reset", "Connection refused")


def _predict(
    trainer: pl.Trainer,
    module: InferenceModule,
    datamodule: TileDataModule,
    cfg: PredictConfig,
    run_dir: Path,
) -> None:
    """``trainer.predict``; a rank that fails or is stopped says so in the store at once."""
    try:
        with warnings.catch_warnings():
            for message in LIGHTNING_NOTICES:
                warnings.filterwarnings("ignore", message=message)
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except torch.distributed.DistError as exc:
        if torch.distributed.is_initialized():
            raise
        # init_process_group timed out: some rank never came (TCPStore "1/2 clients joined").
        from mgpr.errors import RankJoinError

        reason = " ".join(str(exc).split())
        if any(lost in reason for lost in LOST_STORE):
            # rank 0 holds the store: its end of the connection went away before every rank
            # came (it was stopped, Ctrl-C / SIGTERM to the launcher, or it failed): no timeout
            raise RankJoinError(
                f"rank {trainer.global_rank}: rank 0 went away while the {trainer.world_size} "
                f"ranks joined ({reason[:120]}): it was stopped or failed; read its error "
                f"(slurm_logs/<jobid>.err, {run_dir}/logs/rank0.log), then "
                f"{rerun(run_dir)}"
            ) from None
        raise RankJoinError(
            f"rank {trainer.global_rank}: not every one of the {trainer.world_size} ranks "
            f"joined within join_timeout_s={cfg.join_timeout_s} "
            f"({' '.join(str(exc).split())[:160]}); a rank failed or never started: read "
            f"every rank's error (slurm_logs/<jobid>.err, {run_dir}/logs/rank*.log); under "
            f"srun start mgpr in every task (--ntasks-per-node = GPUs per node), or raise "
            f"join_timeout_s if ranks start far apart"
        ) from None
    except BaseException as exc:
        if datamodule.store is not None and trainer.global_rank != 0:
            publish_done(datamodule.store, trainer.global_rank, f"{type(exc).__name__}: {exc}")
        raise
