"""Processes a rank starts never outlive it or print faults that are not theirs.

A DataLoader worker serves each batch's shared memory from a ``multiprocessing.resource_sharer``
thread; a rank stopped by SIGTERM mid-transfer reset that connection and Python printed a
20-line ``ConnectionResetError`` traceback under the clean stop's one line: only that case is
dropped. A rank Lightning launched stops when its launcher is gone, even under a subreaper.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mgpr.run.children import is_handover_race, quiet_fd_handover_races

#: A function compiled under resource_sharer's file name raises as its serving thread does.
SERVE = "def _serve():\n    raise ERROR\n"


def _thread_exception(filename: str, error: BaseException) -> Any:
    """The ExceptHookArgs a thread raising ``error`` from code in ``filename`` produces."""
    scope: dict[str, Any] = {"ERROR": error}
    exec(compile(SERVE, filename, "exec"), scope)  # noqa: S102 - a fixed two-line function
    seen: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = seen.append
    try:
        thread = threading.Thread(target=scope["_serve"])
        thread.start()
        thread.join()
    finally:
        threading.excepthook = previous
    (args,) = seen
    return args


SHARER = "/usr/lib/python3.11/multiprocessing/resource_sharer.py"


@pytest.mark.parametrize(
    ("filename", "error", "dropped"),
    [
        (SHARER, ConnectionResetError(104, "Connection reset by peer"), True),
        (SHARER, BrokenPipeError(32, "Broken pipe"), True),
        (SHARER, ValueError("a real fault"), False),
        ("/work/mgpr/data/dataset.py", ConnectionResetError(104, "reset"), False),
    ],
    ids=["reset-in-sharer", "broken-pipe-in-sharer", "other-error-in-sharer", "reset-elsewhere"],
)
def test_only_a_reset_handover_is_dropped(
    monkeypatch: pytest.MonkeyPatch, filename: str, error: BaseException, dropped: bool
) -> None:
    args = _thread_exception(filename, error)
    assert is_handover_race(args) is dropped
    reached: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # undone after the test
    quiet_fd_handover_races(reached.append)
    threading.excepthook(args)
    assert reached == ([] if dropped else [args])


# ------------------------------------------------ launched ranks and a launcher already gone
CHILD = (
    "import os, sys\n"
    "from mgpr.run.children import die_with_launcher\n"
    "print(die_with_launcher(os.environ), flush=True)\n"
)


@pytest.mark.parametrize(
    ("launcher", "killed"), [("parent", False), ("gone", True)], ids=["launcher-alive", "orphan"]
)
def test_a_launched_rank_whose_launcher_is_gone_stops_at_once(launcher: str, killed: bool) -> None:
    """The launcher's pid, not pid 1, tells an orphan: under a subreaper (tini, a container's
    init) an orphan's parent is the subreaper. Here the parent is this test process."""
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= {"LOCAL_RANK": "1", "MGPR_LAUNCHER_PID": str(os.getpid() if launcher == "parent" else 1)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60
    )
    if killed:
        assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    else:
        assert (proc.returncode, proc.stdout.strip()) == (0, "True"), proc.stderr


def test_rank_zero_records_its_pid_for_the_ranks_it_launches() -> None:
    import os

    from mgpr.run.children import LAUNCHER_PID_ENV, die_with_launcher

    env = {"LOCAL_RANK": "0"}
    assert die_with_launcher(env) is False
    assert env[LAUNCHER_PID_ENV] == str(os.getpid())
