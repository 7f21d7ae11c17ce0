"""Lightning wiring: DataModule, Trainer and the end-of-predict barrier, on one rank.

Distribution is Lightning's (DDP, SLURMEnvironment, ``num_nodes``); sharding is ours
(``use_distributed_sampler=False``): each rank predicts a static, contiguous slice of the tile
plan (:func:`mgpr.data.dataset.shard_tiles`) minus the tiles an earlier run of the same job already
finished. The subtraction happens in :meth:`TileDataModule.setup`, i.e. after the process group
exists, so a rank never reads the shards while rank 0 is still clearing them (``overwrite``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mgpr.conf.schema import PredictConfig
from mgpr.data.batch_pool import PREFETCH_FACTOR, TileLoader
from mgpr.data.batching import UniformShapeBatchSampler
from mgpr.data.dataset import FakeTileDataset, TileDataset, collate_tiles, shard_tiles
from mgpr.data.pinned import CudaHostRegistrar, HostRegistrar, host_memory_plan
from mgpr.data.scaling import ValueScaler
from mgpr.geo.raster import RasterInfo, TileReader
from mgpr.geo.tiling import Tile
from mgpr.geo.values import ValueRange, carrier_dtype
from mgpr.monitor.callback import RunMonitor
from mgpr.monitor.profiler import make_profiler
from mgpr.outputs.shards import count_written_tiles, finished_tile_keys
from mgpr.run.accel import resolve_compile
from mgpr.run.module import InferenceModule
from mgpr.run.writer_callback import PredictionShardWriter

log = logging.getLogger(__name__)


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
    a forked worker would otherwise run the main process's handler and die mid-batch.
    """
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class KeepStopHandler(pl.Callback):
    """Put the caller's SIGTERM handler (mgpr's clean stop) back over Lightning's own.

    Lightning registers a SIGTERM handler just before predict that broadcasts a flag to every
    rank from inside the handler: a rank signalled alone (``kill`` of one task) would block in
    that collective for ``join_timeout_s``. SLURM signals every task of the step, and mgpr's
    handler stops each rank on its own, keeping the shards written so far.
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
    """Builds this rank's DataLoader once the global rank and world size are known."""

    def __init__(
        self,
        cfg: PredictConfig,
        tiles: Sequence[Tile],
        rasters: Sequence[RasterInfo],
        bands: dict[str, list[int]],
        run_dir: Path,
        pin_memory: bool,
        fake_bands: int,
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
        self.rank_tiles: list[Tile] = []
        self.skipped_done = 0

    def setup(self, stage: str) -> None:
        """Take this rank's slice of the plan, minus finished tiles (read after DDP init)."""
        if self.cfg.use_fake_data:
            return
        mine = shard_tiles(self.all_tiles, self.trainer.global_rank, self.trainer.world_size)
        done = finished_tile_keys(self.run_dir)
        self.rank_tiles = [t for t in mine if t.id.key() not in done]
        self.skipped_done = len(mine) - len(self.rank_tiles)
        if self.skipped_done:
            log.info(
                "rank %d: %d of its %d tiles were finished by an earlier run",
                self.trainer.global_rank,
                self.skipped_done,
                len(mine),
            )
        module = self.trainer.lightning_module
        assert isinstance(module, InferenceModule)
        module.tiles = self.rank_tiles

    def predict_dataloader(self) -> DataLoader[Any]:
        """One DataLoader per rank; workers fork (Linux) and open rasters lazily."""
        cfg = self.cfg
        dataset: Any
        if cfg.use_fake_data:
            count = len(
                shard_tiles(
                    range(cfg.dummy_dataset_count),
                    self.trainer.global_rank,  # type: ignore[arg-type]
                    self.trainer.world_size,
                )
            )
            dataset = FakeTileDataset(
                count,
                cfg.tile_size,
                self.fake_bands,
                cfg.dummy_dataset_delay,
                cfg.seed + self.trainer.global_rank,
            )
        else:
            carrier = carrier_dtype((r.path, r.dtype) for r in self.rasters)
            reader = TileReader(self.bands, cfg.tile_size, carrier.name)
            masked = {r.path for r in self.rasters if r.has_mask}
            dataset = TileDataset(self.rank_tiles, reader, masked)
        plan = host_memory_plan(self.pin_memory, cfg.workers, hasattr(dataset, "batch_pool"))
        return make_dataloader(
            dataset,
            cfg.batch_size,
            cfg.workers,
            plan.loader_pin_memory,
            CudaHostRegistrar() if plan.register_pool else None,
        )


def make_dataloader(
    dataset: Any,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    host_registrar: HostRegistrar | None = None,
) -> DataLoader[Any]:
    """The DataLoader every rank uses (also what ``benchmarks/pipeline.py`` times).

    Workers fork on Linux (spawn re-imports torch + Lightning, seconds per worker) and open
    rasters lazily; each keeps ``prefetch_factor`` batches ready. :func:`collate_tiles` passes
    the batches :class:`TileDataset` decodes straight into shared memory through uncopied;
    :class:`~mgpr.data.batch_pool.TileLoader` lets the workers reuse those shared buffers once the
    main process is done with them. With ``host_registrar`` (GPU runs) those buffers are
    registered as pinned memory once (:mod:`mgpr.data.pinned`) and ``pin_memory`` is False.
    """
    kwargs: dict[str, Any] = {}
    shape_keys = getattr(dataset, "shape_keys", None)
    if callable(shape_keys):
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


def _strategy(cfg: PredictConfig, world_size: int, under_srun: bool, accelerator: str) -> Any:
    """DDP whenever more than one rank exists or ``srun`` started us; never single-device there."""
    if cfg.strategy not in ("auto", "ddp"):
        return cfg.strategy
    if world_size > 1 or under_srun or cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            timeout=dt.timedelta(seconds=cfg.join_timeout_s),
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
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
    monitor = RunMonitor(
        run_dir,
        interval_s=0.5,
        total_tiles=total,
        progress=cfg.progress,
        progress_source=None if cfg.use_fake_data else (lambda: count_written_tiles(run_dir)),
    )
    callbacks: list[Any] = [monitor, KeepStopHandler()]
    writer: PredictionShardWriter | None = None
    if not cfg.use_fake_data:
        writer = PredictionShardWriter(
            run_dir,
            {r.path: r for r in rasters},
            cfg.overlap,
            adapter.task,
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
        strategy=_strategy(cfg, world_guess, under_srun, accelerator),
        precision=precision,  # type: ignore[arg-type]
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=True,
        profiler=make_profiler(cfg.profiler, run_dir),
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
    )
    fake_bands = adapter.in_bands or 3
    datamodule = TileDataModule(
        cfg, tiles, rasters, bands, run_dir, pin_memory=accelerator == "gpu", fake_bands=fake_bands
    )
    t0 = time.time()
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except torch.distributed.DistError as exc:
        if torch.distributed.is_initialized():
            raise
        # init_process_group timed out: some rank never came (TCPStore "1/2 clients joined").
        from mgpr.errors import RankJoinError

        raise RankJoinError(
            f"rank {trainer.global_rank}: not every one of the {trainer.world_size} ranks joined "
            f"within join_timeout_s={cfg.join_timeout_s} ({' '.join(str(exc).split())[:160]}); "
            f"a rank failed or never started: read every rank's error (slurm_logs/<jobid>.err, "
            f"{run_dir}/logs/rank*.log); under srun start mgpr in every task (--ntasks-per-node "
            f"= GPUs per node), or raise join_timeout_s if ranks start far apart"
        ) from None
    wall = time.time() - t0
    strategy = trainer.strategy
    # Every rank meets here: the launcher exits non-zero when any rank failed (a dead peer
    # breaks the barrier), and rank 0 merges only after every shard is complete.
    if trainer.world_size > 1:
        try:
            strategy.barrier("mgpr-predict-done")
        except (RuntimeError, torch.distributed.DistError) as exc:
            # A peer died (killed, OOM, node lost): its connection closed under the barrier.
            from mgpr.errors import RankFailedError

            raise RankFailedError(
                f"rank {trainer.global_rank} finished its tiles but another of the "
                f"{trainer.world_size} ranks failed or was killed "
                f"({' '.join(str(exc).split())[:120]}); every finished tile is kept in "
                f"{run_dir}/shards: read {run_dir}/logs/rank*.log, then re-run the same "
                "command to resume"
            ) from None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "tiles_this_rank": len(datamodule.rank_tiles),
        "skipped_done_this_rank": datamodule.skipped_done,
        "predict_wall_s": wall,
        "strategy": type(strategy).__name__,
        "pid": os.getpid(),
        "compile": module.compile_outcome.as_dict() if module.compile_outcome else None,
    }
