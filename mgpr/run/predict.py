"""The run: config in, tiles through ``Trainer.predict`` on every rank, one merged output out.

Order of events on every rank (each step fails fast, before any GPU time is spent):

1. run directory (identical on all ranks), logging; under ``srun`` the ranks join their gloo
   process group first (:mod:`mgpr.run.rendezvous`), then rank 0 takes the run lock;
2. SLURM checks, accelerator and devices;
3. rank 0 decides and tells the others: the demo image, the inputs (raster headers, on their
   model grid with ``gsd=``), the weights download, the value ranges, the run directory's state
   (``run.json`` fingerprint: resume, or refuse to mix runs without ``overwrite=true``); band
   choice and the tile plan are pure and the same on every rank;
4. ``Trainer`` (DDP when more than one rank, never a single-device strategy under ``srun``);
   inside ``predict`` ranks claim chunks of the plan minus tiles already done (in published
   parts, :mod:`mgpr.run.claims`);
5. no timed barrier after predict: rank 0 waits while the missing ranks are alive
   (:mod:`mgpr.run.liveness`), so the launching process exits non-zero when one failed;
6. rank 0 merges the parts (exactly-once proven by the ledger) into ``predictions.gpkg``, writes
   ``summary.json`` and the report; planned tiles in no part fail the run with exit 4.

This module only orders the steps; each lives in its own module of ``mgpr.run`` (devices,
precision, demo, adapter, identity, signals, failures, logs, coordination, rendezvous).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import (
    EXIT_INTERRUPTED,
    EXIT_TILES_FAILED,
    EXIT_TILES_MISSING,
    ConfigError,
    MgprError,
    MissingTilesError,
    OutputError,
)
from mgpr.models.registry import DEFAULT_MODEL, DEMO_MODEL
from mgpr.outputs.rundir import (
    RUN_DIR_ENV,
    check_writable,
    prepare_run_dir,
    rerun,
    resolve_run_dir,
)
from mgpr.outputs.runlock import acquire_run_lock
from mgpr.run.adapter import build_adapter
from mgpr.run.children import die_with_launcher, reap_children
from mgpr.run.coordination import env_rank, host
from mgpr.run.demo import apply_demo_defaults, demo_image
from mgpr.run.devices import resolve_accelerator, resolve_devices
from mgpr.run.failures import translate_failure
from mgpr.run.identity import fingerprint, save_resolved_config
from mgpr.run.logs import (
    RestoreLogging,
    discard_rank_log,
    release_rank_log,
    setup_logging,
    to_log_files,
)
from mgpr.run.precision import resolve_precision
from mgpr.run.rendezvous import EarlyGroup, decided, join_early
from mgpr.run.signals import (
    RunInterrupted,
    install_signal_handlers,
    requeue_on_usr1,
    restore_signal_handlers,
)
from mgpr.run.slurm import check_task_layout, read_slurm_task

log = logging.getLogger("mgpr")


def run(
    cfg: PredictConfig,
    explicit_keys: set[str] | None = None,
    started_unix_s: float | None = None,
) -> int:
    """Run one prediction job on this process's rank; returns the process exit code.

    ``started_unix_s``: when the command started (s since the epoch; the CLI passes its
    process start), so ``summary.json`` ``wall_s`` and ``phases`` cover the imports; None: now.
    """
    previous = install_signal_handlers()
    try:
        with RestoreLogging():
            try:
                return _run(cfg, explicit_keys or set(), started_unix_s)
            except MgprError as exc:  # the one line stderr shows, kept in logs/rank<R>.log too
                to_log_files(f"mgpr: error: {exc}")
                raise
    finally:
        reap_children()  # a worker left behind by an exception must not hang the exit
        restore_signal_handlers(previous)


def _run(cfg: PredictConfig, explicit: set[str], started_unix_s: float | None) -> int:
    t_start = time.time() if started_unix_s is None else started_unix_s
    rank = env_rank(os.environ)
    die_with_launcher(os.environ)  # a launched rank must not outlive a SIGKILLed launcher
    run_dir = resolve_run_dir(cfg.output_dir, os.environ)
    check_writable(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # processes Lightning launches inherit it
    setup_logging(run_dir, rank, hold=True)  # written once this run owns the directory
    lock = None
    try:
        # srun starts every rank at once: they join the process group first, and each decision
        # below is taken by rank 0 and told to the others (run/rendezvous.py).
        task = read_slurm_task(os.environ)
        if task is not None:
            check_task_layout(task)  # before Lightning's own check's traceback in the join
        group = join_early(task, cfg.join_timeout_s)
        # Rank 0 holds the directory's lock for the whole run: a second live run is refused.
        try:
            lock = decided(
                group,
                "the run lock",
                lambda: acquire_run_lock(run_dir, os.environ) if rank == 0 else None,
                share=False,
            )
        except OutputError:
            discard_rank_log()  # a live run's directory: its logs must not read as its failure
            raise
        release_rank_log()
        from mgpr.outputs.runlock import LOCK_FILE
        from mgpr.run.shared_dir import check_one_run_dir

        check_one_run_dir(group, run_dir, run_dir / LOCK_FILE, lock.token if lock else None)
        if rank == 0:
            log_run_dir_filesystem(run_dir)
        return _predict_and_finish(cfg, explicit, run_dir, rank, t_start, group)
    except RunInterrupted as exc:
        # SIGTERM/USR1 may come at any point: during imports, while the model loads, in predict
        # or in rank 0's merge (srun --kill-on-bad-exit TERMs every rank when one fails).
        requeued = requeue_on_usr1(str(exc), rank, _has_published_parts(run_dir, t_start))
        if rank == 0:
            then = "SLURM requeues the job and it resumes" if requeued else rerun(run_dir)
            kept = (
                f"every finished tile is kept in {run_dir}/parts"
                if _has_published_parts(run_dir)
                else "no tile had finished yet"  # stopped in start-up: nothing to keep
            )
            line = (
                f"mgpr: interrupted by {exc}; {kept}; "
                f"{then}{slurm_stop_hint(str(exc), os.environ, requeued)}"
            )
            print(line, file=sys.stderr)
            to_log_files(line, logging.WARNING)
        return EXIT_INTERRUPTED
    finally:
        release_rank_log()  # a failure before the lock still reaches the rank's log
        if lock is not None:
            lock.release()


#: Seconds of clock difference allowed between this node and the file server (part mtimes).
CLOCK_SKEW_S = 5.0


def _has_published_parts(run_dir: Path, since_unix_s: float | None = None) -> bool:
    """Whether the run directory holds a published part (a manifest), this run's or earlier.

    ``since_unix_s``: only a part published since then (its mtime, :data:`CLOCK_SKEW_S` of
    slack) counts: this command's own work. An unreadable folder counts as holding one (the
    reassuring line, and the requeue, as before).
    """
    from mgpr.outputs.parts import MANIFEST_SUFFIX, parts_dir

    folder = parts_dir(run_dir)
    try:
        return folder.is_dir() and any(
            since_unix_s is None or p.stat().st_mtime >= since_unix_s - CLOCK_SKEW_S
            for p in folder.glob(f"*{MANIFEST_SUFFIX}")
            if not p.name.startswith(".")
        )
    except OSError:
        return True


def slurm_stop_hint(signal_name: str, env: Mapping[str, str], requeued: bool) -> str:
    """Under srun, what else a SIGTERM may mean: a task that died (``--kill-on-bad-exit``).

    srun stops every task with SIGTERM when one fails, so a rank killed by the OOM killer reads
    as an interrupt on the others; ``srun: error: <node>: task <n>: Killed`` above this line,
    and ``sacct``, tell a dead rank from ``scancel``.
    """
    job = env.get("SLURM_JOB_ID")
    tasks = env.get("SLURM_NTASKS", "1")
    if requeued or not job or signal_name != "SIGTERM":
        return ""
    # A TERM is also SLURM's preemption and `scontrol requeue`: then the job comes back alone.
    requeue = (
        f" (unless SLURM requeues job {job} itself, as on preemption or scontrol requeue: "
        "then it resumes without you)"
    )
    if not tasks.isdigit() or int(tasks) < 2:
        return requeue
    return (
        f"{requeue} (if `srun: error: ... task N: Killed` or `Out Of Memory` is above, rank N "
        f"died and srun stopped the others: `sacct -j {job} -o JobID,State,ExitCode,MaxRSS` "
        "says why)"
    )


def written(run_dir: Path) -> list[Path]:
    """The run directory's folders of result rasters, which a run never reads as inputs."""
    from mgpr.outputs.features import FEATURES_DIR
    from mgpr.outputs.parts import PARTS_DIR
    from mgpr.tasks.segmentation import SEGMENTATION_DIR

    return [run_dir / name for name in (PARTS_DIR, FEATURES_DIR, SEGMENTATION_DIR)]


def _local_rank() -> int:
    """This rank's index on its node (``SLURM_LOCALID`` / ``LOCAL_RANK``)."""
    return int(os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK", "0")))


def log_run_dir_filesystem(run_dir: Path) -> None:
    """One log line with the run directory's filesystem; a warning per known-bad mount option."""
    from mgpr.outputs.filesystem import describe_mount, mount_warnings, run_dir_mount

    mount = run_dir_mount(run_dir)
    log.info("run directory %s on %s", run_dir, describe_mount(mount))
    for problem in mount_warnings(mount) if mount is not None else []:
        log.warning("run directory: %s", problem)


def _predict_and_finish(
    cfg: PredictConfig,
    explicit: set[str],
    run_dir: Path,
    rank: int,
    t_start: float,
    group: EarlyGroup | None,
) -> int:
    """Everything after the run directory is known: inputs, model, predict, rank 0's merge."""
    demo = apply_demo_defaults(cfg, explicit)
    model_name = cfg.model or (DEMO_MODEL if demo else DEFAULT_MODEL)

    accelerator = resolve_accelerator(cfg.accelerator)
    devices, num_nodes, slurm_task = resolve_devices(cfg, accelerator)
    if slurm_task is not None:
        log.info(
            "SLURM job %s: rank %d of %d on node %s (node rank %d of %d, local rank %d)",
            slurm_task.job_id,
            slurm_task.procid,
            slurm_task.ntasks,
            os.environ.get("SLURMD_NODENAME", host()),
            slurm_task.nodeid,
            num_nodes,
            slurm_task.localid,
        )

    truth_path: Path | None = None
    rasters: list[Any] = []
    aoi_summary: dict[str, Any] | None = None
    tiles: list[Any] = []
    bands: dict[str, list[int]] = {}
    if not cfg.use_fake_data:
        from mgpr.geo.inputs import resolve_inputs, spelled_as_before
        from mgpr.outputs.rundir import earlier_input_paths
        from mgpr.run.launched_headers import input_headers

        if demo:
            image, truth_path = decided(
                group,
                "the demo image",
                lambda: demo_image(run_dir, cfg, rank, cfg.tile_size, cfg.overlap),
            )
            input_path: str | list[str] = str(image)
        else:
            assert cfg.input_path is not None
            input_path = cfg.input_path
        # Inputs are checked before the model is built: a typo in a path must not wait for
        # (or fail on) a weights download.
        from mgpr.models.registry import is_import_path
        from mgpr.run.values import refuse_unscaled_early

        def inputs() -> tuple[list[Any], dict[str, Any] | None]:
            paths = resolve_inputs(input_path, written(run_dir))
            if not cfg.overwrite:  # a resume names each file as the run it resumes did
                paths = spelled_as_before(paths, earlier_input_paths(run_dir))
            found = input_headers(paths, run_dir, rank)  # launched ranks: rank 0's
            if cfg.gsd is not None:  # tiles, boxes and footprints on each raster's model grid
                from mgpr.geo.gsd import describe_crs_scale, describe_model_grid, on_model_grids

                found = on_model_grids(found, cfg.gsd, cfg.resampling)
                if rank == 0:
                    from mgpr.run.input_warnings import log_a_few

                    grids = [f"gsd={cfg.gsd:g} m: {describe_model_grid(r)}" for r in found]
                    notes = [describe_crs_scale(r, cfg.gsd) for r in found]
                    log_a_few(
                        logging.INFO, grids, "input(s) on model grids (summary.json resolution)"
                    )
                    log_a_few(
                        logging.WARNING,
                        [f"gsd={cfg.gsd:g} m: {note}" for note in notes if note],
                        "input(s) with such a note on their CRS's scale",
                    )
            area = None
            if cfg.aoi is not None:  # each raster gets the area in its (model-grid) pixels
                from mgpr.geo.aoi import on_aoi, read_aoi

                aoi = read_aoi(cfg.aoi)
                given = [r.path for r in found]
                found = on_aoi(found, aoi)
                kept = {r.path for r in found}
                area = {
                    "path": aoi.path,
                    "crs": aoi.crs_label,
                    "polygons": aoi.polygons,
                    "sha256": aoi.digest,
                    "inputs_outside": [p for p in given if p not in kept],
                }
            if cfg.output_crs is not None:
                from mgpr.geo.reproject import check_output_crs

                check_output_crs(found, cfg.output_crs)
            if not is_import_path(model_name):
                refuse_unscaled_early(cfg, found)  # before any weights download
            return found, area

        rasters, aoi_summary = decided(group, "the inputs", inputs)
    # Rank 0 builds first (it downloads missing weights); then the others load the cache.
    adapter = decided(
        group, "the weights", lambda: build_adapter(cfg, model_name, rank), share=False
    )
    if adapter is None:
        adapter = build_adapter(cfg, model_name, rank, local_rank=_local_rank())
    value_ranges = None
    if not cfg.use_fake_data:
        from mgpr.geo.aoi import tiles_in_aoi
        from mgpr.geo.bands import check_bands

        tiles_outside_aoi = 0

        if rank == 0:
            from mgpr.run.input_warnings import note_alpha_beside_nodata, warn_ungeoreferenced

            warn_ungeoreferenced(rasters)
            note_alpha_beside_nodata(rasters)
        band_notes: list[tuple[str, str]] = []
        for info in rasters:
            bands[info.path] = check_bands(info, cfg.bands, adapter.in_bands, band_notes)
            planned, outside = tiles_in_aoi(info, cfg.tile_size, cfg.overlap)  # all w/o aoi=
            tiles_outside_aoi += outside
            tiles.extend(planned)
        if rank == 0:
            from mgpr.run.input_warnings import log_notes

            log_notes(band_notes, "input(s) whose bands are chosen so too")
        if aoi_summary is not None:
            aoi_summary["tiles_outside"] = tiles_outside_aoi
            if rank == 0:
                log.info(
                    "aoi=%s (%s): %d tile(s) touch it, %d outside are not read",
                    cfg.aoi,
                    aoi_summary["crs"],
                    len(tiles),
                    tiles_outside_aoi,
                )
        from mgpr.geo.values import carrier_dtype
        from mgpr.run.values import resolve_value_ranges

        carrier = carrier_dtype((r.path, r.dtype) for r in rasters)  # refuses unreadable dtypes
        if rasters:
            from mgpr.data.batch_pool import batch_beyond_memory
            from mgpr.monitor.part import host_memory_limit

            memory = host_memory_limit()
            too_big = batch_beyond_memory(
                cfg.batch_size,
                max(len(b) for b in bands.values()),
                cfg.tile_size,
                carrier.itemsize,
                memory.bytes if memory else None,
                max(((r.height, r.width) for r in rasters), key=lambda hw: hw[0] * hw[1]),
                memory.source if memory else "node",
            )
            if too_big:
                raise ConfigError(too_big)
        value_ranges = decided(
            group,
            "the value ranges",
            lambda: resolve_value_ranges(cfg, rasters, bands, adapter, rank),
        )
        from mgpr.run.input_warnings import has_seams, padding_warning
        from mgpr.tasks import get_task

        overlap_warning = get_task(adapter.task).overlap_warning
        if rank == 0 and overlap_warning and cfg.overlap == 0 and has_seams(tiles):
            log.warning("%s", overlap_warning)  # one tile a raster (chips): no seam to cut
        padding = padding_warning(rasters, tiles, cfg.tile_size) if rank == 0 else None
        if padding:
            log.warning("%s", padding)
        if rank == 0:
            from mgpr.run.unused_keys import unused_key_lines

            for line in unused_key_lines(cfg, adapter.task, explicit):
                log.warning("%s", line)
        if (
            cfg.tta_fusion != "nms"
            and rank == 0
            and (cfg.tta == "none" or adapter.task != "detection")
        ):
            log.warning(
                "tta_fusion=%s fuses a detector's tta views; this run has %s, so it does "
                "nothing (set tta=flips or tta=d4 with a detector)",
                cfg.tta_fusion,
                "no tta" if cfg.tta == "none" else f"a {adapter.task} model",
            )

        def run_dir_state() -> bool:
            run_identity = fingerprint(
                cfg,
                model_name,
                adapter.weights_id,
                rasters,
                bands,
                value_ranges,
                aoi_sha256=aoi_summary["sha256"] if aoi_summary else None,
            )
            job_id = os.environ.get("SLURM_JOB_ID")
            resumed = prepare_run_dir(run_dir, run_identity, cfg.overwrite, rank, job_id)
            if rank == 0:
                save_resolved_config(run_dir, cfg, model_name)
            return resumed

        resumed = decided(group, "the run directory's state (resume or refuse)", run_dir_state)
        if resumed and rank == 0:
            log.info("resuming the run in %s: finished tiles are skipped", run_dir)
    precision = resolve_precision(cfg.precision, accelerator)

    from mgpr.run.trainer import run_predict

    try:
        stats = run_predict(
            cfg,
            run_dir=run_dir,
            adapter=adapter,
            rasters=rasters,
            tiles=tiles,
            bands=bands,
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
            slurm_task=slurm_task,
            value_ranges=value_ranges,
        )
    except Exception as exc:
        known = translate_failure(exc, cfg, run_dir, accelerator, rank)
        if known is not None:
            raise known from None
        raise
    finally:
        if rank == 0:
            from mgpr.run.launched_headers import remove_shared_headers

            remove_shared_headers(run_dir)
    if stats["global_rank"] != 0:
        return 0
    from mgpr.run.failures import file_system_error, is_file_system_error
    from mgpr.run.finish import finish_run

    try:
        summary = finish_run(
            cfg,
            run_dir=run_dir,
            adapter=adapter,
            model_name=model_name,
            rasters=rasters,
            tiles=tiles,
            stats=stats,
            precision=precision,
            t_start=t_start,
            truth_path=truth_path,
            demo=demo,
            value_ranges=value_ranges,
            aoi=aoi_summary,
        )
    except Exception as exc:  # the merge's writes: a full disk is one line, the parts stay
        if is_file_system_error(exc):
            raise file_system_error(exc, run_dir, rank) from None
        raise
    failed = summary.get("tiles_failed", 0)
    if failed:
        line = (
            f"mgpr: {failed} of {summary['tiles_total']} tile(s) failed and are not in the "
            f"output; reasons in {run_dir / 'failed_tiles.csv'}; "
            f"{rerun(run_dir, 'retry only them')} (exit code {EXIT_TILES_FAILED})"
        )
        print(line, file=sys.stderr)
        to_log_files(line, logging.WARNING)  # the rank's log ends with the run's last word
    missing = summary.get("tiles_missing", 0)
    if missing:
        raise MissingTilesError(
            f"{missing} of {summary['tiles_total']} planned tile(s) are in no published part, so "
            f"they are not in the output; listed in {summary['missing_tiles']}; "
            f"{rerun(run_dir, 'predict only them')} (exit code {EXIT_TILES_MISSING})"
        )
    return EXIT_TILES_FAILED if failed else 0


__all__ = ["run", "RunInterrupted", "env_rank", "resolve_precision", "resolve_accelerator"]
