"""Keep a stopped run's stderr to its one line: no C++ frame dumps, no helper-thread tracebacks.

When a run stops (Ctrl-C, ``scancel``, SIGTERM from ``srun --kill-on-bad-exit``, a rank that
died), two things besides mgpr wrote to stderr, burying the line that says what happened and
how to resume:

- torch's C++ warnings from the process group's TCP store as its peers go away
  (``[W TCPStore.cpp:125] [c10d] recvValue failed ... Exception raised from recvBytes ...
  frame #0 ... frame #21``, some 25 lines a rank);
- the traceback of :mod:`multiprocessing`'s ``resource_sharer`` thread (which hands
  DataLoader workers' shared-memory file descriptors to the rank) when a worker or the rank at
  the other end of its socket is gone (``ConnectionResetError: [Errno 104]``).

Neither says anything the stop line does not; both read as a crash. C++ logging starts at
errors unless the user set ``TORCH_CPP_LOG_LEVEL`` (``TORCH_CPP_LOG_LEVEL=WARNING`` shows the
warnings again); the helper thread's lost connections go to the log at debug level, and
every other thread exception keeps Python's handling.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from typing import Any

log = logging.getLogger(__name__)

#: Exceptions of a helper thread that mean only "the process at the other end is gone".
LOST_PEER = (ConnectionResetError, BrokenPipeError, EOFError, ConnectionRefusedError)
#: Files of the helper threads whose lost peers are quiet.
QUIET_THREAD_FILES = ("multiprocessing/resource_sharer.py",)


def install() -> None:
    """Set the C++ log level default and the thread hook; before torch is imported."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if getattr(threading.excepthook, "_mgpr_quiet", False):
        return
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if is_lost_peer_of_helper(args.exc_type, args.exc_traceback):
            log.debug("%s: %s (a peer process is gone)", args.thread, args.exc_value)
            return
        previous(args)

    hook._mgpr_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def is_lost_peer_of_helper(exc_type: type[BaseException] | None, tb: Any) -> bool:
    """True for a lost connection raised in one of :data:`QUIET_THREAD_FILES`."""
    if exc_type is None or not issubclass(exc_type, LOST_PEER) or tb is None:
        return False
    files = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_tb(tb)]
    return any(f.endswith(name) for f in files for name in QUIET_THREAD_FILES)
