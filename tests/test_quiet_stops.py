"""A stopped run's stderr keeps its one line: helper threads' lost peers and C++ logs quiet."""

from __future__ import annotations

import threading

import pytest

from mgpr.run import quiet_stops


def _thread_raising(exc: BaseException, filename: str) -> threading.Thread:
    """A thread whose target raises ``exc`` from code compiled under ``filename``."""
    scope: dict[str, object] = {}
    exec(compile("def serve(exc):\n    raise exc\n", filename, "exec"), scope)  # noqa: S102
    return threading.Thread(target=scope["serve"], args=(exc,))


def test_a_helper_threads_lost_peer_is_quiet_and_any_other_error_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    quiet_stops.install()
    quiet_stops.install()  # twice: one hook
    import os

    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    sharer = "/usr/lib/python3.11/multiprocessing/resource_sharer.py"
    for exc, where in (
        (ConnectionResetError(104, "Connection reset by peer"), sharer),  # quiet
        (BrokenPipeError(32, "Broken pipe"), sharer),  # quiet
        (ValueError("a bug"), sharer),  # not a lost peer: Python's handling
        (ConnectionResetError(104, "reset"), "/work/mine.py"),  # another thread's: too
    ):
        thread = _thread_raising(exc, where)
        thread.start()
        thread.join()
    assert seen == [ValueError, ConnectionResetError]


def test_a_users_cpp_log_level_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    quiet_stops.install()
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "WARNING"
