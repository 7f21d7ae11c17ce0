"""Who this process is among the ranks, and how ranks wait for what rank 0 makes.

The global rank is known from the environment before the process group exists (``RANK`` from
Lightning's launcher or torchrun, ``SLURM_PROCID`` inside an ``srun`` step).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable


def env_rank(env: dict[str, str] | os._Environ[str]) -> int:
    """This process's global rank before the Trainer exists (RANK, SLURM_PROCID, LOCAL_RANK)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in env and (key != "SLURM_PROCID" or "SLURM_STEP_ID" in env):
            return int(env[key])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    local = int(env.get("LOCAL_RANK", "0"))
    world_local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    return node * world_local + local


def host() -> str:
    """Short host name."""
    return socket.gethostname().split(".")[0]


def wait_for_rank0(ready: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
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
