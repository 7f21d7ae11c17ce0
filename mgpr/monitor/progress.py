r"""Whole-job progress on rank 0: a one-line ``\r`` bar on a TTY, else a log line every N seconds.

The count comes from a callable (tiles done by ALL ranks, e.g. read from the published parts),
never from a collective, so a slow rank never blocks the display or the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import IO

logger = logging.getLogger(__name__)


def _hms(seconds: float | None) -> str:
    """``HH:MM:SS``, or ``--:--:--`` when unknown, negative, NaN or absurdly large."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360_000_000:
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(done: int, total: int | None, elapsed_s: float) -> str:
    """``"progress: 1234/5000 tiles (24.7%), 41.2 tiles/s, ETA 00:01:31"`` (whole job)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        eta = (total - done) / rate if rate > 0 else None
        pct = 100.0 * done / total
        return f"progress: {done}/{total} tiles ({pct:.1f}%), {rate:.1f} tiles/s, ETA {_hms(eta)}"
    return f"progress: {done} tiles, {rate:.1f} tiles/s"


def isatty(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal; False for streams that cannot tell."""
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001
        return False


class Progress:
    r"""The progress display; :meth:`tick` is called from the sampling thread.

    Args:
        t0: monotonic time (s) predict started.
        total: tiles of the whole job, or None when unknown (no % and no ETA).
        source: returns the tiles done so far by all ranks.
        tty: draw a ``\r`` bar (refreshed every second) instead of log lines.
        log_every_s: seconds between log lines when not on a TTY.
        stream: where the bar goes.
    """

    def __init__(
        self,
        *,
        t0: float,
        total: int | None,
        source: Callable[[], int],
        tty: bool,
        log_every_s: float,
        stream: IO[str],
    ) -> None:
        self.t0 = t0
        self.total = total
        self.source = source
        self.tty = tty
        self.every_s = 1.0 if tty else log_every_s
        self.stream = stream
        self.next_s = t0 + (0.0 if tty else log_every_s)
        self.width = 0
        self.last_done: int | None = None  # the count the last line showed

    def tick(self, now: float, force: bool = False) -> None:
        """Show the progress if its interval has passed (or ``force``); ``now`` is monotonic s."""
        if not force and now < self.next_s:
            return
        self.next_s = now + self.every_s
        done = self.source()
        self.last_done = done
        line = progress_line(done, self.total, now - self.t0)
        if self.tty:
            bar = ""
            if self.total:
                filled = int(min(1.0, max(0.0, done / self.total)) * 20)
                bar = "[" + "#" * filled + "." * (20 - filled) + "] "
            text = bar + line.removeprefix("progress: ")
            pad = " " * max(0, self.width - len(text))
            self.width = len(text)
            self.stream.write("\r" + text + pad)
            self.stream.flush()
        else:
            logger.info(line)

    def close(self, now: float) -> None:
        """Show the final count and end the bar's line."""
        self.tick(now, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def final(self, now: float) -> None:
        """After every rank is done: one more line if the count moved since :meth:`close`.

        Rank 0 closes the display when ITS loop ends; the other ranks' last tiles come after,
        so without this the last line stayed short of the job's total (1032/1296).
        """
        done = self.source()
        if done == self.last_done:
            return
        self.tick(now, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
