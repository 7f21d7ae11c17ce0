"""One live run per run directory, with a lock that works on NFS and Lustre.

Two runs in one ``output_dir`` (a re-run started while the first still predicts, two ``srun``
steps of one job) would both append their tiles and both merge. Rank 0 of a run holds
``<run_dir>/.mgpr-run.lock`` for the run's whole life: created with ``O_CREAT | O_EXCL`` (atomic
on NFSv3+ and Lustre, unlike ``flock``, which Lustre mounted without ``flock`` refuses and NFS
may not forward), holding who owns it (host, pid, SLURM job id and restart count), and its
modification time refreshed every :data:`HEARTBEAT_S` seconds by a daemon thread.

A lock whose owner is known to be dead is taken over: same host and the pid is gone, or the same
SLURM job in an earlier incarnation (a requeue, ``SLURM_RESTART_COUNT`` grew), or a heartbeat
older than :data:`STALE_AFTER_S` (a node that died). Anything else is a live run: refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgpr.errors import OutputError

log = logging.getLogger(__name__)

LOCK_FILE = ".mgpr-run.lock"
#: Seconds between heartbeats (``os.utime`` of the lock file).
HEARTBEAT_S = 10.0
#: A heartbeat older than this (s) means the owner died; generous for clock skew between hosts.
STALE_AFTER_S = 120.0


class RunLock:
    """The lock of one run directory, held by this process until :meth:`release`."""

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="mgpr-run-lock", daemon=True
        )
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                os.utime(self.path)
            except OSError:  # removed under us: nothing to refresh; release() copes
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join(5.0)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def acquire_run_lock(
    run_dir: Path,
    env: Mapping[str, str],
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> RunLock:
    """Take the run directory's lock, or raise OutputError when another live run holds it."""
    path = run_dir / LOCK_FILE
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT", "0"),
        "started_at": time.time(),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path) or {}
            dead = _owner_is_dead(holder, path, me, stale_after_s)
            if dead is None:
                raise OutputError(_refusal(run_dir, holder, path)) from None
            log.info("taking over the lock of %s: %s", run_dir, dead)
            path.unlink(missing_ok=True)  # another taker may race us: O_EXCL decides
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return RunLock(path, me["token"], heartbeat_s)
    raise OutputError(
        f"output_dir={str(run_dir)!r}: could not take its lock {path} (other runs keep taking "
        "it); start one run per output_dir"
    )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _owner_is_dead(
    holder: dict[str, Any], path: Path, me: dict[str, Any], stale_after_s: float
) -> str | None:
    """Why the lock's owner is dead, or None when it may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "the lock went away"
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old"
    if not holder:
        return None  # being written right now (or unreadable): treat as live
    if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
        return f"process {holder.get('pid')} on {holder.get('host')} is gone"
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"]:
        if str(holder.get("slurm_restart_count")) != str(me["slurm_restart_count"]):
            return f"SLURM job {job} was requeued"
    return None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but not ours, or unreadable: assume alive
    return True


def _refusal(run_dir: Path, holder: dict[str, Any], path: Path) -> str:
    who = (
        f"host {holder.get('host')}, pid {holder.get('pid')}"
        + (f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")
        if holder
        else "another process"
    )
    return (
        f"output_dir={str(run_dir)!r} is in use by a live run ({who}); wait for it to finish or "
        f"choose another output_dir (if that run is dead, delete {path})"
    )
