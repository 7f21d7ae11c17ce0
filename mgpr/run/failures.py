"""Rank failures as one line: out of memory, a dead DataLoader worker, a worker that raised.

Both keep every finished tile (a re-run resumes) and name the config key to lower.
"""

from __future__ import annotations

from pathlib import Path

from mgpr.conf.schema import PredictConfig
from mgpr.errors import MgprError, ResourceError, WorkerFailedError


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError`` and the allocators' plain RuntimeErrors."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def out_of_memory_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, accelerator: str, rank: int
) -> MgprError:
    """One line naming ``batch_size`` and a smaller value; the parts published so far are kept."""
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
        f"every finished tile is kept in {run_dir / 'parts'}; {fix}"
    )


def is_worker_death(exc: BaseException) -> bool:
    """True for the DataLoader's error when one of its worker processes died (signal, exit)."""
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and "DataLoader worker" in text
        and ("exited unexpectedly" in text or "killed by signal" in text)
    )


def worker_death_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, rank: int
) -> MgprError:
    """One line: which worker died, the usual causes and how to resume with less memory."""
    first = " ".join(str(exc).split()).split(". ")[0][:200]
    smaller = (
        f"workers={max(1, cfg.workers // 2)}"
        if cfg.workers > 1
        else f"batch_size={max(1, cfg.batch_size // 2)}"
    )
    return ResourceError(
        f"a DataLoader worker of rank {rank} died ({first}); the usual causes are too little "
        f"shared memory (/dev/shm) or host memory for workers={cfg.workers} x "
        f"batch_size={cfg.batch_size}; every finished tile is kept in {run_dir / 'parts'}; "
        f"re-run with {smaller} (or more memory) to resume"
    )


def is_worker_exception(exc: BaseException) -> bool:
    """True for an exception a DataLoader worker raised, re-raised by torch in the rank."""
    return "in DataLoader worker process" in str(exc).split("\n", 1)[0]


def worker_exception_error(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, rank: int
) -> MgprError:
    """One line: the worker's own exception (its last line), what is kept, how to see more."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    cause = " ".join(lines[-1].split())[:300] if lines else type(exc).__name__
    return WorkerFailedError(
        f"a DataLoader worker of rank {rank} failed: {cause}; every finished tile is kept in "
        f"{run_dir}; re-run with workers=0 to see the whole traceback (it resumes), and report "
        "it if it is not about your input"
    )


def translate_failure(
    exc: BaseException, cfg: PredictConfig, run_dir: Path, accelerator: str, rank: int
) -> MgprError | None:
    """The one-line error for a known failure of the predict loop, or None (a bug: traceback)."""
    if is_out_of_memory(exc):
        return out_of_memory_error(exc, cfg, run_dir, accelerator, rank)
    if is_worker_death(exc):
        return worker_death_error(exc, cfg, run_dir, rank)
    if is_worker_exception(exc):
        return worker_exception_error(exc, cfg, run_dir, rank)
    return None
