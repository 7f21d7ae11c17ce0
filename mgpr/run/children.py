"""DataLoader workers never outlive their rank, nor launched ranks their launcher.

Workers ignore SIGTERM (:func:`mgpr.run.trainer.ignore_stop_signals`: ``scancel`` signals every
process of a step and the rank, not its workers, decides how to stop). The price: when the rank
leaves the predict loop through an exception, the DataLoader may never shut its workers down, and
at interpreter exit ``multiprocessing`` terminates them with SIGTERM, which they ignore, then
joins them: the rank hangs forever. :func:`reap_children` ends the rank's own multiprocessing
children instead (workers hold no state: they only decode tiles into shared memory).

Ranks that Lightning's launcher started (``gpus=N`` on one machine) are the launcher's children:
when it is SIGKILLed they lived on (parent pid 1), predicting until their next claim and then
printing a lost-connection line into the terminal of the next run. :func:`die_with_launcher`
asks the kernel to send such a rank SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``),
which it takes as a clean stop.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("mgpr")


def reap_children(grace_s: float = 2.0) -> int:
    """Kill this process's multiprocessing children still alive after ``grace_s`` seconds.

    Returns:
        How many had to be killed (SIGKILL).
    """
    deadline = time.monotonic() + grace_s
    killed = 0
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(5.0)
            killed += 1
    if killed:
        log.debug("killed %d leftover DataLoader worker process(es)", killed)
    return killed


#: ``prctl`` option: the signal this process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def die_with_launcher(env: Mapping[str, str]) -> bool:
    """A rank started by Lightning's launcher gets SIGTERM when the launcher dies (Linux).

    Only for ranks other than 0 with ``LOCAL_RANK`` set outside SLURM (srun's tasks are no
    one's children; rank 0 is the launcher). Returns whether the request was made.
    """
    if not sys.platform.startswith("linux") or "SLURM_PROCID" in env:
        return False
    try:
        if int(env.get("LOCAL_RANK", "0")) == 0:
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, ValueError, AttributeError):
        return False  # no prctl: the rank stops at its next claim, as before
    if os.getppid() == 1:  # the launcher died before the request: stop now
        os.kill(os.getpid(), signal.SIGTERM)
    return True
