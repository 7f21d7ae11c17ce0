"""Every rank of a run must see one run directory: refuse a node-local ``output_dir`` at once.

On several nodes, ``output_dir=/tmp/run`` (or ``$TMPDIR/run``, a node-local scratch disk) is a
different folder on every node: each rank would predict into its own ``parts/``, rank 0's merge
would find the other nodes' tiles in no published part and exit 4, and every re-run would do
the same. Right after rank 0 takes the run lock, each rank looks for that lock file (by the
random token rank 0 wrote into it) and the answers are gathered: if any rank cannot see it,
every rank stops with the same line before a tile is read, naming the ranks and their hosts.

Only for ranks joined early (under ``srun``, :mod:`mgpr.run.rendezvous`); ranks started by
Lightning's launcher run on one machine and share its folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mgpr.errors import OutputError
from mgpr.run.coordination import host
from mgpr.run.rendezvous import EarlyGroup, decided

#: Seconds a rank keeps looking for rank 0's lock file (NFS attribute caches lag a little).
SEE_WAIT_S = 15.0
_POLL_S = 0.5


def sees_token(lock_path: Path, token: str, wait_s: float = SEE_WAIT_S) -> bool:
    """True once ``lock_path`` exists here and holds ``token``; False after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if json.loads(lock_path.read_text(encoding="utf-8")).get("token") == token:
                return True
        except (OSError, ValueError, AttributeError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def check_one_run_dir(
    group: EarlyGroup | None,
    run_dir: Path,
    lock_path: Path,
    token: str | None,
    wait_s: float = SEE_WAIT_S,
) -> None:
    """Raise the same OutputError on every rank when some rank cannot see rank 0's lock.

    Args:
        group: the early group; None (one rank, or Lightning's launcher): nothing to check.
        run_dir: this rank's run directory (the same path string on every rank).
        lock_path: the run lock's file, as rank 0 created it.
        token: rank 0's lock token (None on the other ranks: rank 0 tells them).
        wait_s: how long a rank looks before it answers that it cannot see the file.
    """
    if group is None:
        return
    import torch.distributed as dist

    told, where = decided(group, "the run lock's token", lambda: (token, str(run_dir)))
    sees = group.rank == 0 or (told is not None and sees_token(lock_path, told, wait_s))
    answers: list[tuple[int, str, bool] | None] = [None] * group.world_size
    dist.all_gather_object(answers, (group.rank, host(), sees))
    blind = [a for a in answers if a is not None and not a[2]]
    if not blind:
        return
    rank0_host = next((a[1] for a in answers if a is not None and a[0] == 0), "?")
    shown = ", ".join(f"rank {r} on {h}" for r, h, _ in blind[:4])
    more = f" and {len(blind) - 4} more" if len(blind) > 4 else ""
    raise OutputError(
        f"output_dir={where!r} is not one folder for every rank: {shown}{more} cannot "
        f"see the lock file {lock_path.name} that rank 0 wrote there on {rank0_host}, so their "
        "tiles would never reach the merge; on several nodes put output_dir on a shared "
        "filesystem (Lustre, GPFS, NFS), not on node-local disk such as /tmp or $TMPDIR"
    )


__all__ = ["SEE_WAIT_S", "check_one_run_dir", "sees_token"]
