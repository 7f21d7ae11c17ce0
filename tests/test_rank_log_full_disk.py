"""A rank's log on a full disk stops with one line instead of a traceback per record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mgpr.run.logs import RankLogHandler


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_log_that_cannot_be_written_says_so_once(capsys) -> None:
    log = logging.getLogger("mgpr.test.fulldisk")
    log.propagate = False
    handler = RankLogHandler("/dev/full")  # every write: ENOSPC, as on a full disk
    log.addHandler(handler)
    try:
        for i in range(5):
            log.warning("record %d", i)
    finally:
        log.removeHandler(handler)
        handler.close()  # raised OSError at the end of a disk-full run
    err = capsys.readouterr().err
    assert err.count("mgpr: warning: cannot write /dev/full") == 1
    assert "No space left on device" in err and "--- Logging error ---" not in err
    assert handler.broken
