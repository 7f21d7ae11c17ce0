"""Accelerator and device count of a run, after the SLURM allocation checks."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import ConfigError

log = logging.getLogger("mgpr")


def resolve_accelerator(requested: str) -> str:
    """``gpu`` or ``cpu``: auto picks the GPU when torch sees one, else CPU ranks (gloo)."""
    import torch

    has_gpu = torch.cuda.is_available()
    if requested in ("gpu", "cuda"):
        if not has_gpu:
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


def resolve_devices(cfg: PredictConfig, accelerator: str) -> tuple[int, int, Any]:
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
        raise ConfigError(
            f"gpus={devices} but this machine has {torch.cuda.device_count()} GPU(s); "
            f"use gpus={torch.cuda.device_count()} or fewer"
        )
    check_manual_nodes(cfg.num_nodes, os.environ)
    return devices, cfg.num_nodes or 1, None


#: Launchers whose environment Lightning reads to join nodes without ``MASTER_ADDR`` set by
#: hand: torchrun (torchelastic), LSF, Open MPI / PMI.
NODE_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_manual_nodes(num_nodes: int | None, env: Mapping[str, str]) -> None:
    """Refuse ``num_nodes`` > 1 outside SLURM when no other node could find this one.

    Without SLURM, Lightning joins nodes only when each node runs the same command with
    ``MASTER_ADDR`` (rank 0's host), ``MASTER_PORT`` and its own ``NODE_RANK``, or under a
    launcher it knows (torchrun, LSF, MPI). Without either, rank 0 listened on 127.0.0.1 and
    waited ``join_timeout_s`` (300 s) for ranks that nobody started, then failed.
    """
    if not num_nodes or num_nodes <= 1:
        return
    if env.get("MASTER_ADDR") or any(env.get(v) for v in NODE_LAUNCHER_VARS):
        return
    raise ConfigError(
        f"num_nodes={num_nodes} outside SLURM needs the same command started on every node "
        "with MASTER_ADDR (this node's address), MASTER_PORT and NODE_RANK set (MASTER_ADDR is "
        "unset here); "
        f"on a SLURM cluster submit with sbatch --nodes={num_nodes} jobs/job.slurm ... "
        "instead, on one machine leave num_nodes unset"
    )
