"""DataLoader workers never outlive their rank.

Workers ignore SIGTERM (:func:`mgpr.run.trainer.ignore_stop_signals`: ``scancel`` signals every
process of a step and the rank, not its workers, decides how to stop). The price: when the rank
leaves the predict loop through an exception, the DataLoader may never shut its workers down, and
at interpreter exit ``multiprocessing`` terminates them with SIGTERM, which they ignore, then
joins them: the rank hangs forever. :func:`reap_children` ends the rank's own multiprocessing
children instead (workers hold no state: they only decode tiles into shared memory).
"""

from __future__ import annotations

import logging
import multiprocessing
import time

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
