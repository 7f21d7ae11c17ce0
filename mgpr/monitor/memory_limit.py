"""The memory this process may use: the node's, or less where a cgroup limits it.

``sbatch --mem=16G`` on a 512 GiB node (SLURM's task/cgroup plugin), a container's memory
limit, or a systemd slice all bound a job below the node's physical memory: past the bound the
kernel kills it (``oom-kill``), however much the node has free. So the start-up check of one
batch's size and the CPU run report's memory share compare with the smaller of the two.

Read from ``/proc/self/cgroup`` and the cgroup filesystem, both versions: v2 (``0::<path>``,
``memory.max``) and v1 (the ``memory`` controller's ``<path>``, ``memory.limit_in_bytes``).
Every level from this process's cgroup up to the mount's root counts (SLURM sets the limit on
the job's cgroup, the task's is below it); a level that is not there (a container sees only its
own part of the tree) is skipped; ``max`` and v1's page-rounded 2^63 are no limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

#: v1 reports "no limit" as the largest page-aligned int64 (9223372036854771712); anything
#: this large is no limit on any real machine.
UNLIMITED_FROM = 2**60


class MemoryLimit(NamedTuple):
    """Bytes this process may use and where the bound comes from (``cgroup`` or ``node``)."""

    bytes: int
    source: str


def _levels(root: Path, path: str) -> list[Path]:
    """``root/path`` and each of its parents down to ``root``, deepest first."""
    parts = [p for p in path.strip().split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_limit(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < UNLIMITED_FROM else None


def cgroup_memory_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The tightest cgroup memory limit on this process (bytes), or None where there is none.

    Args:
        proc_cgroup: this process's cgroup membership (``/proc/self/cgroup``).
        cgroup_root: where the cgroup filesystems are mounted: v2 at the root (or at
            ``unified/`` on a hybrid system, where it holds no memory controller), v1's
            memory controller at ``memory/``.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":  # v2
            for base in (cgroup_root, cgroup_root / "unified"):
                for level in _levels(base, path):
                    limit = _read_limit(level / "memory.max")
                    if limit is not None:
                        limits.append(limit)
        elif "memory" in controllers.split(","):  # v1
            for level in _levels(cgroup_root / controllers, path):
                limit = _read_limit(level / "memory.limit_in_bytes")
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def memory_limit(physical: int | None, cgroup: int | None) -> MemoryLimit | None:
    """The smaller of the node's physical memory and the cgroup limit (None: neither known)."""
    if cgroup is not None and (physical is None or cgroup < physical):
        return MemoryLimit(cgroup, "cgroup")
    if physical is not None:
        return MemoryLimit(physical, "node")
    return None
