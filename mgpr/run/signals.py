"""Stop signals: SIGTERM / SIGUSR1 / SIGINT stop the rank cleanly, keeping what is published.

SLURM signals every process of a step (``scancel``, preemption, ``--signal=USR1@N`` before the
time limit), sometimes twice; Ctrl-C reaches the whole foreground process group. The handler
raises :class:`RunInterrupted` in the main thread once; the run turns it into one line and
:data:`~mgpr.errors.EXIT_INTERRUPTED`. On SIGUSR1 under SLURM, rank 0 requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from mgpr.errors import RunInterrupted

log = logging.getLogger("mgpr")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

__all__ = [
    "RunInterrupted",
    "STOP_SIGNALS",
    "install_signal_handlers",
    "restore_signal_handlers",
    "requeue_on_usr1",
]


def install_signal_handlers() -> dict[int, Any]:
    """SIGTERM/SIGUSR1 (SLURM preemption, ``scancel``) and Ctrl-C stop the run cleanly.

    Returns the previous handlers so :func:`restore_signal_handlers` can put them back (tests
    run in-process).
    """
    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        # SLURM signals every process of the step, sometimes twice (USR1 then TERM on preemption,
        # srun --kill-on-bad-exit): once stopping, a repeated TERM/USR1 must not interrupt the
        # clean-up (publishing the last part, scontrol requeue). Ctrl-C twice still forces its way.
        if stopping and signum != signal.SIGINT:
            return
        stopping.append(signum)
        raise RunInterrupted(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    for sig, old in previous.items():
        signal.signal(sig, old)


def requeue_on_usr1(signal_name: str, rank: int, progressed: bool = True) -> bool:
    """On SIGUSR1 (``sbatch --signal=USR1@N``: time limit near), rank 0 requeues the job.

    Preemption needs nothing from us: SLURM requeues a preempted job itself and sends SIGTERM.
    ``progressed``: whether this attempt published any finished tile. One that did not is not
    requeued: with ``--time`` shorter than the warning's lead (or than start-up plus it) every
    attempt would be warned before its first tile and requeue itself forever (3 requeues of 0
    tiles each were seen with ``--time=1``). Returns True when the job is (being) requeued.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name != "SIGUSR1" or not job:
        return False
    if rank != 0:
        return True
    if not progressed:
        log.warning(
            "not requeuing SLURM job %s: this attempt finished no tile before SIGUSR1 (the "
            "time-limit warning), so a requeue would stop the same way; raise sbatch --time "
            "well above the warning's lead (--signal=USR1@<seconds>) plus start-up",
            job,
        )
        return False
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
