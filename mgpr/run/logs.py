"""Per-rank logging: one file per rank in ``<run>/logs/``, rank 0 alone talks on stderr.

Every rank logs INFO to ``logs/rank<R>.log`` (the first place to read when a rank fails); on
stderr rank 0 shows INFO and the others only warnings, so a 32-rank job's terminal stays
readable. A record logged with ``extra={"file_only": True}`` goes to the file alone (a rank's
closing figures, which the console shows in the report's table).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_NOISY = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "torch",
    "rasterio",
    "fiona",
    "pyogrio",
    "matplotlib",
    "PIL",
)

#: Name of the root logger's handler that writes ``logs/rank<R>.log`` (its ``baseFilename`` is
#: the path a one-line error can point to for the traceback).
RANK_LOG_HANDLER = "mgpr-rank-log"


class RankLogHandler(logging.FileHandler):
    """``logs/rank<R>.log``, which stops quietly (one line on stderr) when it cannot write.

    On a full disk every record failed with logging's ``--- Logging error ---`` block and a
    traceback, and closing the handler at the end raised once more: a disk-full stop ended in
    pages of tracebacks around its one line. The first failure says once that this rank's log
    is cut off there; later records go to stderr's handler alone.
    """

    broken = False
    #: Records kept back until the run owns its directory (:meth:`write_held`), or None.
    held: list[logging.LogRecord] | None = None
    #: Set by :meth:`discard`: nothing is ever written (the directory is another run's).
    silenced = False

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record, unless an earlier write failed; keep it back while held."""
        if self.silenced:
            return
        if self.held is not None:
            self.held.append(record)
            return
        if not self.broken:
            super().emit(record)

    def hold(self) -> None:
        """Keep records back: the run does not yet know that the directory is its own."""
        if self.held is None and not self.silenced:
            self.held = []

    def write_held(self) -> None:
        """Write the records kept back, then write as they come.

        (Not ``release``: that is logging.Handler's lock.)
        """
        records, self.held = self.held, None
        for record in records or []:
            self.emit(record)

    def discard(self) -> None:
        """Drop the records kept back and write nothing more: a live run owns the directory.

        A run refused by another live run's lock appended its lines (its refusal included) to
        that run's ``logs/rank<R>.log``, which then read as if the live run had failed.
        """
        self.held, self.silenced = None, True

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """The first failed write: one line on stderr, then the handler is off."""
        self._give_up(sys.exc_info()[1])

    def flush(self) -> None:
        """Flush, and stop on a failure instead of raising."""
        try:
            super().flush()
        except OSError as exc:
            self._give_up(exc)

    def close(self) -> None:
        """Close, and stop on a failure instead of raising (RestoreLogging closes it)."""
        try:
            super().close()
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: BaseException | None) -> None:
        if self.broken:
            return
        self.broken = True
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "a write failed"
        try:
            sys.stderr.write(
                f"mgpr: warning: cannot write {self.baseFilename} ({reason}); this rank's log "
                "stops here, stderr goes on\n"
            )
        except OSError:
            pass


def setup_logging(run_dir: Path, rank: int, hold: bool = False) -> None:
    """Replace the root logger's handlers with this rank's file and stderr handlers.

    ``hold``: the file keeps its records back until :func:`release_rank_log` (the run took
    the directory's lock) or drops them at :func:`discard_rank_log` (another run holds it);
    nothing is created in ``logs/`` until then.
    """
    logs = run_dir / "logs"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = RankLogHandler(logs / f"rank{rank}.log", delay=True)
    file_handler.set_name(RANK_LOG_HANDLER)  # messages that point to the log find it by name
    if hold:
        file_handler.hold()
    else:
        logs.mkdir(parents=True, exist_ok=True)
    file_handler.setFormatter(fmt)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream.addFilter(lambda record: not getattr(record, "file_only", False))  # the log's alone
    root.addHandler(file_handler)
    root.addHandler(stream)
    root.setLevel(logging.INFO)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rank_log_handlers() -> list[RankLogHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, RankLogHandler)]


def release_rank_log() -> None:
    """The run owns its directory: write the rank log's held records (creating ``logs/``)."""
    for handler in _rank_log_handlers():
        if handler.held is not None:
            try:
                Path(handler.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                handler._give_up(exc)
            handler.write_held()


def discard_rank_log() -> None:
    """Another live run owns the directory: its rank logs get none of this run's lines."""
    for handler in _rank_log_handlers():
        handler.discard()


def to_log_files(line: str, level: int = logging.ERROR) -> None:
    """Write ``line`` to this rank's log file(s) only (``logs/rank<R>.log``), not to stderr.

    The line a run ends with (its error, its interruption) is printed once on stderr; without
    this the rank's log, the first place to read after a job, never held it.
    """
    record = logging.LogRecord("mgpr", level, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class RestoreLogging:
    """Context manager: leave the root logger as found (``run()`` is called in-process by tests)."""

    def __enter__(self) -> RestoreLogging:
        root = logging.getLogger()
        self._handlers, self._level = list(root.handlers), root.level
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in self._handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in self._handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(self._level)
