"""The process group first, then rank 0 decides and the others are told.

Under ``srun`` every task starts at once. Before this module the ranks coordinated through
files on the shared filesystem before the process group existed: the other ranks polled for
rank 0's demo image and weights download and each read ``run.json`` itself. With NFS attribute
caching or a node-local ``TORCH_HOME`` a rank then waited ``join_timeout_s`` and failed, or
read a stale ``run.json``.

Now the ranks of an ``srun`` step join a gloo process group first (:func:`join_early`, the
group Lightning later reuses: its DDP strategy skips ``init_process_group`` when one exists),
and each decision that only rank 0 may take goes through :func:`decided`: rank 0 computes it,
the result (or rank 0's one-line error) is broadcast, and every other rank returns it or raises
the same error at once, never after a timeout.

Runs started by Lightning's own launcher (``gpus=2`` on a workstation) cannot join early: the
child ranks are started by rank 0 only once it reaches ``Trainer.predict``, after it took every
decision. There :func:`decided` simply runs the decision on each rank, as before: the children
find rank 0's files already in place on the same machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from mgpr.errors import MgprError, RankJoinError

log = logging.getLogger("mgpr")

T = TypeVar("T")


class EarlyGroup:
    """The gloo process group of an ``srun`` step, joined before any decision.

    Attributes:
        rank: global rank (``SLURM_PROCID``).
        world_size: ranks in the step (``SLURM_NTASKS``).
        timeout_s: ``join_timeout_s``: how long a rank waits in each collective of the start-up
            (joining, and every decision rank 0 broadcasts).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s


#: The rendezvous ports of srun steps: 20,000 from 15,000 (Lightning's own base).
STEP_PORT_BASE, STEP_PORT_SPAN = 15000, 20000


def step_port(job_id: str, step_id: str) -> int | None:
    """The TCP port of one srun step's rendezvous: one per step of a job, the same on its ranks.

    Lightning's is ``15000 + last 4 digits of the job id``, the same for every step of a job:
    two ``srun`` steps running at once (``srun ... &`` twice in one script) met at one port,
    the second failing with EADDRINUSE (and its other ranks connecting to the first step's
    store). None when the ids are not numbers (then Lightning's port stands).
    """
    if not job_id.isdigit() or not step_id.isdigit():
        return None
    return STEP_PORT_BASE + (int(job_id) * 97 + int(step_id)) % STEP_PORT_SPAN


def join_early(task: Any, timeout_s: float) -> EarlyGroup | None:
    """Join the step's gloo process group now (srun with more than one task), else None.

    The address and port are Lightning's (:class:`SLURMEnvironment`: ``MASTER_ADDR``/
    ``MASTER_PORT`` or the first node of the step), the port one of this step's own
    (:func:`step_port`) unless ``MASTER_PORT`` is set, so the group is the one Lightning's DDP
    strategy would have made; it finds it initialised and keeps it.

    Raises:
        RankJoinError: not every rank joined within ``timeout_s``.
    """
    if task is None or task.ntasks < 2:
        return None
    import torch.distributed as dist
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if dist.is_initialized():
        return EarlyGroup(dist.get_rank(), dist.get_world_size(), timeout_s)
    own_port = step_port(getattr(task, "job_id", ""), getattr(task, "step_id", ""))
    if own_port is not None and not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(own_port)  # Lightning's DDP reads the same one later
    env = SLURMEnvironment(auto_requeue=False)
    address, port = env.main_address, env.main_port
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{address}:{port}",
            rank=task.procid,
            world_size=task.ntasks,
            timeout=dt.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, dist.DistError) as exc:
        reason = " ".join(str(exc).split())
        if "EADDRINUSE" in reason or "address already in use" in reason.lower():
            raise RankJoinError(
                f"rank {task.procid}: port {port} on {address} is in use (another srun step "
                "or job on that node took it), so the ranks could not meet there; set "
                "MASTER_PORT to a free port (1024-65535) in the job script, one per step run "
                "at once"
            ) from None
        raise RankJoinError(
            f"rank {task.procid}: not every one of the {task.ntasks} ranks joined "
            f"{address}:{port} within join_timeout_s={timeout_s:g} "
            f"({' '.join(str(exc).split())[:160]}); a rank failed or never started: read every "
            "rank's error (slurm_logs/<jobid>.err); start mgpr in every task of the step, or "
            "raise join_timeout_s if tasks start far apart"
        ) from None
    log.info(
        "rank %d of %d joined the process group at %s:%d", task.procid, task.ntasks, address, port
    )
    return EarlyGroup(task.procid, task.ntasks, timeout_s)


def decided(group: EarlyGroup | None, what: str, decide: Callable[[], T], share: bool = True) -> T:
    """Rank 0 runs ``decide`` and tells every rank its result (or its error).

    Args:
        group: the early group, or None (one rank, or ranks started by Lightning's launcher):
            then ``decide`` runs on this rank, which is the behaviour callers had before.
        what: what is decided, for the error of a rank whose rank 0 failed ("the inputs").
        decide: the decision; must be picklable when ``share`` (it travels by pickle).
        share: False for results that stay on rank 0 (the run lock): the others get None once
            rank 0 succeeded.

    Raises:
        MgprError: rank 0's own error (the same class and line on every rank).
        RankJoinError: rank 0 failed with an unexpected error or did not answer in time.
    """
    if group is None:
        return decide()
    box: list[Any] = [None]
    if group.rank == 0:
        try:
            value = decide()
        except MgprError as exc:
            box[0] = ("error", exc)
            _broadcast(box, group, what)
            raise
        except BaseException as exc:
            box[0] = ("failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            with contextlib.suppress(RankJoinError):
                _broadcast(box, group, what)
            raise
        box[0] = ("ok", value if share else None)
        _broadcast(box, group, what)
        return value
    _broadcast(box, group, what)
    kind, payload = box[0]
    if kind == "ok":
        return payload  # type: ignore[no-any-return]
    if kind == "error":
        # Rank 0 prints this line itself: the others keep it in their logs, not on stderr,
        # so a 32-task job's .err holds it once, not 32 times.
        payload.told_by_rank0 = True
        raise payload
    raise RankJoinError(
        f"rank {group.rank}: rank 0 failed while deciding {what} ({payload}); read rank 0's "
        "log (<run_dir>/logs/rank0.log)"
    )


def _broadcast(box: list[Any], group: EarlyGroup, what: str) -> None:
    """``broadcast_object_list`` from rank 0, its timeout turned into one line."""
    import torch.distributed as dist

    try:
        dist.broadcast_object_list(box, src=0)
    except (RuntimeError, dist.DistError) as exc:
        raise RankJoinError(
            f"rank {group.rank}: rank 0 did not tell {what} within join_timeout_s="
            f"{group.timeout_s:g} ({' '.join(str(exc).split())[:160]}); rank 0 failed or is "
            "slow: read rank 0's log (<run_dir>/logs/rank0.log), or raise join_timeout_s"
        ) from None


__all__ = ["EarlyGroup", "decided", "join_early"]
