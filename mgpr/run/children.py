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

A worker hands each batch's shared memory to its rank by file descriptor, served from a thread
of the worker (``multiprocessing.resource_sharer``); when the rank stops mid-transfer that
thread's connection is reset and Python printed a 20-line traceback under the clean stop's one
line. :func:`quiet_fd_handover_races` drops exactly those (seen once in five SIGTERMs of
``gpus=2``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

log = logging.getLogger("mgpr")


#: Errors of a file-descriptor handover whose receiver went away: the rank stopped or died.
HANDOVER_ERRORS = (ConnectionResetError, BrokenPipeError, EOFError, ConnectionRefusedError)


def is_handover_race(args: Any) -> bool:
    """Whether a thread's exception is a reset fd handover (``multiprocessing.resource_sharer``).

    ``args``: :class:`threading.ExceptHookArgs`. Only the errors of a receiver that went away,
    raised inside ``resource_sharer``'s serving thread, count; anything else is a real fault.
    """
    if not isinstance(args.exc_value, HANDOVER_ERRORS):
        return False
    tb = args.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(
            "multiprocessing/resource_sharer.py"
        ):
            return True
        tb = tb.tb_next
    return False


def quiet_fd_handover_races(hook: Callable[[Any], None] | None = None) -> None:
    """Keep the thread excepthook, minus reset fd handovers (see the module docstring).

    ``hook``: the hook to wrap (default: the current ``threading.excepthook``).
    """
    inner = hook or threading.excepthook

    def excepthook(args: Any) -> None:
        if not is_handover_race(args):
            inner(args)

    threading.excepthook = excepthook


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


#: The launcher's pid, set by rank 0 for the ranks Lightning starts from it: a rank whose parent
#: is no longer that process was orphaned before it could ask for PDEATHSIG.
LAUNCHER_PID_ENV = "MGPR_LAUNCHER_PID"


def die_with_launcher(env: MutableMapping[str, str]) -> bool:
    """A rank started by Lightning's launcher gets SIGTERM when the launcher dies (Linux).

    Only for ranks other than 0 with ``LOCAL_RANK`` set outside SLURM (srun's tasks are no
    one's children; rank 0 is the launcher, and records its pid in ``env`` for them, which
    they inherit). Returns whether the request was made.

    The launcher may die before the request: the rank is then already an orphan, reparented
    to pid 1 or to a subreaper (``tini``, ``systemd --user``, a container's init), so the
    check is "is my parent still the launcher", not "is my parent pid 1".
    """
    if not sys.platform.startswith("linux") or "SLURM_PROCID" in env:
        return False
    try:
        if int(env.get("LOCAL_RANK", "0")) == 0:
            env[LAUNCHER_PID_ENV] = str(os.getpid())  # before Lightning starts the others
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, ValueError, AttributeError):
        return False  # no prctl: the rank stops at its next claim, as before
    launcher = env.get(LAUNCHER_PID_ENV, "")
    parent = os.getppid()
    if parent == 1 or (launcher.isdigit() and parent != int(launcher)):
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher died before the request: stop now
    return True
