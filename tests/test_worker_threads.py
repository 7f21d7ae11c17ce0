"""A DataLoader worker's fd handover reset by a stopping rank prints no traceback.

The worker serves each batch's shared memory from a ``multiprocessing.resource_sharer``
thread; a rank stopped by SIGTERM mid-transfer reset that connection and Python printed a
20-line ``ConnectionResetError`` traceback under the clean stop's one line. Only that case is
dropped: the same error elsewhere, or another error there, still reaches the hook.
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
