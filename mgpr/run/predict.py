"""The run: config in, tiles through ``Trainer.predict`` on every rank, one merged output out.

Order of events on every rank (each step fails fast, before any GPU time is spent):

1. run directory (identical on all ranks), logging, SLURM checks, accelerator and devices;
2. inputs -> raster headers -> band choice -> tile plan (pure, the same on every rank);
3. model built (rank 0 first when weights must be downloaded; the others load from the cache);
4. ``run.json`` fingerprint checked (resume, or refuse to mix runs without ``overwrite=true``);
5. ``Trainer`` (DDP when more than one rank, never a single-device strategy under ``srun``);
   inside ``predict`` each rank takes its static slice of the tile plan minus tiles already done;
6. every rank meets at a barrier, so the launching process exits non-zero when any rank failed;
7. rank 0 merges the shards into ``predictions.gpkg``, writes ``summary.json`` and the report.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import EXIT_INTERRUPTED, EXIT_TILES_FAILED, MgprError, ModelError
from mgpr.outputs.rundir import (
    RUN_DIR_ENV,
    check_writable,
    prepare_run_dir,
    resolve_run_dir,
)

log = logging.getLogger("mgpr")

DEMO_TILE_SIZE = 512
DEMO_OVERLAP = 64


class RunInterrupted(BaseException):
    """Raised in the main thread by SIGTERM / SIGUSR1 / SIGINT: stop, keep what is written."""


def env_rank(env: dict[str, str] | os._Environ[str]) -> int:
    """This process's global rank before the Trainer exists (RANK, SLURM_PROCID, LOCAL_RANK)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in env and (key != "SLURM_PROCID" or "SLURM_STEP_ID" in env):
            return int(env[key])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    local = int(env.get("LOCAL_RANK", "0"))
    world_local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    return node * world_local + local


def _setup_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(fmt)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(file_handler)
    root.addHandler(stream)
    root.setLevel(logging.INFO)
    for noisy in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "torch",
        "rasterio",
        "fiona",
        "pyogrio",
        "matplotlib",
        "PIL",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_accelerator(requested: str) -> str:
    """``gpu`` or ``cpu``: auto picks the GPU when torch sees one, else CPU ranks (gloo)."""
    import torch

    has_gpu = torch.cuda.is_available()
    if requested in ("gpu", "cuda"):
        if not has_gpu:
            from mgpr.errors import ConfigError

            raise ConfigError(
                "accelerator=gpu but torch sees no CUDA GPU on this machine; use accelerator=auto "
                "or cpu, or check the node's driver with `mgpr-doctor`"
            )
        return "gpu"
    if requested == "cpu":
        return "cpu"
    if not has_gpu and os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning(
            "CUDA_VISIBLE_DEVICES=%s is set but torch sees no GPU: running on CPU ranks (gloo)",
            os.environ["CUDA_VISIBLE_DEVICES"],
        )
    return "gpu" if has_gpu else "cpu"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, accelerator: str) -> str:
    """Lightning precision string; ``auto`` = bf16 where the device runs it fast.

    Ampere and newer GPUs (compute capability >= 8) and CPUs with AVX-512 BF16/AMX get
    ``bf16-mixed``; older GPUs ``16-mixed``; other CPUs ``32-true``.
    """
    if requested != "auto":
        return "32-true" if requested == "32" else requested
    if accelerator == "gpu":
        import torch

        major, _ = torch.cuda.get_device_capability(0)
        return "bf16-mixed" if major >= 8 else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def _resolve_devices(cfg: PredictConfig, accelerator: str) -> tuple[int, int, Any]:
    """(devices per node, num_nodes, SLURM task or None) after the SLURM checks."""
    import torch

    from mgpr.run import slurm

    task = slurm.read_slurm_task(os.environ)
    if task is not None:
        for line in slurm.check_slurm_task(
            task, cfg.gpus, cfg.num_nodes, cfg.workers, accelerator, torch.cuda.device_count()
        ):
            log.warning("%s", line)
        devices, nodes = slurm.resolve_devices(task, cfg.gpus, cfg.num_nodes)
        return devices, nodes, task
    if cfg.gpus is not None:
        devices = cfg.gpus
    else:
        devices = max(1, torch.cuda.device_count()) if accelerator == "gpu" else 1
    if accelerator == "gpu" and devices > torch.cuda.device_count():
        from mgpr.errors import ConfigError

        raise ConfigError(
            f"gpus={devices} but this machine has {torch.cuda.device_count()} GPU(s); "
            f"use gpus={torch.cuda.device_count()} or fewer"
        )
    return devices, cfg.num_nodes or 1, None


def _wait_for_rank0(ready: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    """Poll ``ready`` until it holds (True) or ``timeout_s`` seconds pass (False).

    For the files only rank 0 makes before the ranks join (demo image, downloaded weights):
    the other ranks cannot use a collective yet, so they watch the shared file system.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _demo_image(
    run_dir: Path, cfg: PredictConfig, rank: int, tile_size: int, overlap: int
) -> tuple[Path, Path | None]:
    """The quick start's synthetic orthomosaic (with planted objects), made once per run dir.

    Rank 0 writes it (to a temporary name, then renamed: image first, truth second); the other
    ranks wait for both files. Each rank writing its own copy would give each file its own
    modification time, which is part of the run's fingerprint: under ``srun`` ranks start
    together, and a rank reading rank 0's ``run.json`` would take the run for another one.

    Raises:
        RankJoinError: rank 0 did not write the image within ``join_timeout_s``.
    """
    from mgpr.testimage import TestImageSpec, write_test_image

    path = run_dir / "demo" / "demo_ortho.tif"
    truth = path.with_name(f"{path.stem}_truth.gpkg")

    def ready() -> bool:
        return path.exists() and (cfg.objects == 0 or truth.exists())

    if rank != 0 and not _wait_for_rank0(ready, cfg.join_timeout_s, poll_s=0.2):
        from mgpr.errors import RankJoinError

        raise RankJoinError(
            f"rank {rank} waited join_timeout_s={cfg.join_timeout_s} s for rank 0 to "
            f"write the demo image {path}; rank 0 failed or never started: read "
            f"{run_dir}/logs/rank0.log (or pass input_path=)"
        )
    if ready():
        return path, truth if truth.exists() else None
    log.info(
        "no input_path: making a synthetic %dx%d orthomosaic with %d planted objects "
        "in %s (the quick start's pipeline check)",
        cfg.image_size,
        cfg.image_size,
        cfg.objects,
        path,
    )
    # Objects on seams must fit inside the overlap to be seen whole by one tile; with a small
    # overlap the demo plants objects away from seams only.
    on_seams = overlap >= 12
    spec = TestImageSpec(
        width=cfg.image_size,
        height=cfg.image_size,
        objects=cfg.objects,
        tile_size=tile_size,
        overlap=overlap,
        seed=cfg.seed,
        object_max_px=min(40, overlap) if on_seams else 40,
        seam_share=0.5 if on_seams else 0.0,
    )
    result = write_test_image(path, spec)
    return result.path, result.truth_path


def _fingerprint(
    cfg: PredictConfig,
    model_name: str,
    weights_id: str,
    rasters: Sequence[Any],
    bands: dict[str, list[int]],
) -> dict[str, Any]:
    return {
        "model": model_name,
        "weights": weights_id,
        "tile_size": cfg.tile_size,
        "overlap": cfg.overlap,
        "topk": cfg.topk,
        "score_threshold": cfg.score_threshold,
        "native_resolution": cfg.native_resolution,
        "inputs": [
            {"path": r.path, "bytes": r.file_bytes, "mtime": r.mtime, "bands": bands[r.path]}
            for r in rasters
        ],
    }


def _save_resolved_config(run_dir: Path, cfg: PredictConfig, model_name: str) -> None:
    """``config.yaml``: every key as this run used it (aliases resolved, model chosen)."""
    import dataclasses

    from omegaconf import OmegaConf

    resolved = dataclasses.replace(cfg, model=model_name)
    text = OmegaConf.to_yaml(OmegaConf.structured(resolved))
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")


def _build_adapter(cfg: PredictConfig, model_name: str, rank: int) -> Any:
    """Build the model; with downloads, rank 0 fetches and the other ranks wait for the file."""
    from mgpr.models import build_model
    from mgpr.models.weights import weights_cache_file, weights_cached

    kwargs = dict(
        topk=cfg.topk,
        score_threshold=cfg.score_threshold,
        native_resolution=cfg.native_resolution,
        tile_size=cfg.tile_size,
    )
    if rank != 0 and model_name in ("resnet50", "fasterrcnn"):
        try:
            target = weights_cache_file(model_name, cfg.weights)
        except MgprError:
            target = None
        if target is not None and not _wait_for_rank0(
            lambda: weights_cached(model_name, cfg.weights), cfg.join_timeout_s, poll_s=1.0
        ):
            raise ModelError(
                f"rank {rank} waited {cfg.join_timeout_s} s for rank 0 to download "
                f"weights={cfg.weights} for {model_name} into {target.parent}; "
                f"pre-fetch them with `mgpr-fetch-weights {model_name}`"
            )
    return build_model(model_name, cfg.weights, **kwargs)


def _install_signal_handlers() -> dict[int, Any]:
    """SIGTERM/SIGUSR1 (SLURM preemption, ``scancel``) and Ctrl-C stop the run cleanly.

    Returns the previous handlers so :func:`run` can restore them (tests run in-process).
    """
    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        # SLURM signals every process of the step, sometimes twice (USR1 then TERM on preemption,
        # srun --kill-on-bad-exit): once stopping, a repeated TERM/USR1 must not interrupt the
        # clean-up (flushing the shard, scontrol requeue). Ctrl-C twice still forces its way.
        if stopping and signum != signal.SIGINT:
            return
        stopping.append(signum)
        raise RunInterrupted(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def _requeue_on_usr1(signal_name: str, rank: int) -> bool:
    """On SIGUSR1 (``sbatch --signal=USR1@N``: time limit near), rank 0 requeues the job.

    Preemption needs nothing from us: SLURM requeues a preempted job itself and sends SIGTERM.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name != "SIGUSR1" or not job:
        return False
    if rank != 0:
        return True
    import subprocess

    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not requeue job %s: %s", job, exc)
        return False
    if proc.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.info("requeued SLURM job %s; it resumes from the finished tiles", job)
    return True


def _is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError`` and the allocators' plain RuntimeErrors."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _out_of_memory_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, accelerator: str, rank: int
) -> MgprError:
    """One line naming ``batch_size`` and a smaller value; the shards written so far are kept."""
    from mgpr.errors import ResourceError

    first = " ".join(str(exc).split()).split(". ")[0][:160]
    where = "the GPU" if accelerator == "gpu" else "the host"
    if cfg.batch_size > 1:
        fix = f"re-run with batch_size={cfg.batch_size // 2} to resume"
    else:
        fix = (
            f"batch_size is already 1: re-run with a smaller tile_size (now {cfg.tile_size}) "
            "and overwrite=true, or precision=16-mixed"
        )
    return ResourceError(
        f"out of memory on {where} (rank {rank}) with batch_size={cfg.batch_size} ({first}); "
        f"every finished tile is kept in {run_dir / 'shards'}; {fix}"
    )


def _is_worker_death(exc: BaseException) -> bool:
    """True for the DataLoader's error when one of its worker processes died (signal, exit)."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "DataLoader worker" in text
        and ("exited unexpectedly" in text or "killed by signal" in text)
    )


def _worker_death_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, rank: int
) -> MgprError:
    """One line: which worker died, the usual causes and how to resume with less memory."""
    from mgpr.errors import ResourceError

    first = " ".join(str(exc).split()).split(". ")[0][:200]
    smaller = (
        f"workers={max(1, cfg.workers // 2)}"
        if cfg.workers > 1
        else f"batch_size={max(1, cfg.batch_size // 2)}"
    )
    return ResourceError(
        f"a DataLoader worker of rank {rank} died ({first}); the usual causes are too little "
        f"shared memory (/dev/shm) or host memory for workers={cfg.workers} x "
        f"batch_size={cfg.batch_size}; every finished tile is kept in {run_dir / 'shards'}; "
        f"re-run with {smaller} (or more memory) to resume"
    )


def run(cfg: PredictConfig, explicit_keys: set[str] | None = None) -> int:
    """Run one prediction job on this process's rank; returns the process exit code."""
    previous = _install_signal_handlers()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        return _run(cfg, explicit_keys or set())
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        # Leave logging as found (matters when run() is called in-process, e.g. by tests).
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)


def _run(cfg: PredictConfig, explicit: set[str]) -> int:
    t_start = time.time()
    rank = env_rank(os.environ)
    run_dir = resolve_run_dir(cfg.output_dir, os.environ)
    check_writable(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # processes Lightning launches inherit it
    _setup_logging(run_dir, rank)
    try:
        return _predict_and_finish(cfg, explicit, run_dir, rank, t_start)
    except RunInterrupted as exc:
        # SIGTERM/USR1 may come at any point: during imports, while the model loads, in predict
        # or in rank 0's merge (srun --kill-on-bad-exit TERMs every rank when one fails).
        requeued = _requeue_on_usr1(str(exc), rank)
        if rank == 0:
            then = (
                "SLURM requeues the job and it resumes"
                if requeued
                else "re-run the same command to resume"
            )
            print(
                f"mgpr: interrupted by {exc}; every finished tile is kept in {run_dir}/shards; "
                f"{then}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


def _predict_and_finish(
    cfg: PredictConfig, explicit: set[str], run_dir: Path, rank: int, t_start: float
) -> int:
    """Everything after the run directory is known: inputs, model, predict, rank 0's merge."""
    demo = cfg.input_path is None and not cfg.use_fake_data
    if demo:
        if "tile_size" not in explicit:
            cfg.tile_size = DEMO_TILE_SIZE
        if "overlap" not in explicit:
            cfg.overlap = DEMO_OVERLAP
    model_name = cfg.model or ("reference" if demo else "resnet50")
    if demo and cfg.model is None and "weights" not in explicit:
        cfg.weights = "none"

    accelerator = resolve_accelerator(cfg.accelerator)
    devices, num_nodes, slurm_task = _resolve_devices(cfg, accelerator)
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
    tiles: list[Any] = []
    bands: dict[str, list[int]] = {}
    if not cfg.use_fake_data:
        from mgpr.geo.raster import describe_raster, resolve_inputs

        if demo:
            image, truth_path = _demo_image(run_dir, cfg, rank, cfg.tile_size, cfg.overlap)
            input_path = str(image)
        else:
            assert cfg.input_path is not None
            input_path = cfg.input_path
        # Inputs are checked before the model is built: a typo in a path must not wait for
        # (or fail on) a weights download.
        rasters = [describe_raster(path) for path in resolve_inputs(input_path)]
    adapter = _build_adapter(cfg, model_name, rank)  # warns itself about random weights
    if not cfg.use_fake_data:
        from mgpr.geo.raster import check_bands
        from mgpr.geo.tiling import plan_tiles

        for info in rasters:
            if info.crs_wkt is None and rank == 0:
                log.warning(
                    "%s has no CRS: its results are in pixel coordinates (x = column, y = row)",
                    info.path,
                )
            bands[info.path] = check_bands(info, cfg.bands, adapter.in_bands)
            tiles.extend(plan_tiles(info.path, info.height, info.width, cfg.tile_size, cfg.overlap))
        if adapter.task == "detection" and cfg.overlap == 0 and rank == 0:
            log.warning(
                "overlap=0 with a detector: objects cut by a tile seam are found as "
                "two halves; set overlap to at least the largest object's size in pixels"
            )
        fingerprint = _fingerprint(cfg, model_name, adapter.weights_id, rasters, bands)
        job_id = os.environ.get("SLURM_JOB_ID")
        resumed = prepare_run_dir(run_dir, fingerprint, cfg.overwrite, rank, job_id)
        if rank == 0:
            _save_resolved_config(run_dir, cfg, model_name)
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
        )
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise _out_of_memory_error(exc, cfg, run_dir, accelerator, rank) from None
        if _is_worker_death(exc):
            raise _worker_death_error(exc, cfg, run_dir, rank) from None
        raise
    if stats["global_rank"] != 0:
        return 0
    from mgpr.run.finish import finish_run

    summary = finish_run(
        cfg,
        run_dir=run_dir,
        adapter=adapter,
        model_name=model_name,
        rasters=rasters,
        stats=stats,
        precision=precision,
        t_start=t_start,
        truth_path=truth_path,
        demo=demo,
    )
    failed = summary.get("tiles_failed", 0)
    if failed:
        print(
            f"mgpr: {failed} of {summary['tiles_total']} tile(s) failed and are not in the "
            f"output; reasons in {run_dir / 'failed_tiles.csv'}; re-run the same command to "
            f"retry only them (exit code {EXIT_TILES_FAILED})",
            file=sys.stderr,
        )
    return EXIT_TILES_FAILED if failed else 0


def host() -> str:
    """Short host name."""
    return socket.gethostname().split(".")[0]


__all__ = ["run", "RunInterrupted", "env_rank", "resolve_precision", "resolve_accelerator"]
