"""The rank's background part writer: batches in, a chunk out every 256 tiles, 64 MiB or 5 s.

The predict loop hands each batch's outcomes to :meth:`BackgroundPartWriter.put` and goes on;
a thread gathers them into chunks and publishes each (:class:`~mgpr.outputs.parts.PartWriter`)
when it holds :data:`CHUNK_TILES` tiles or :data:`CHUNK_BYTES` of tile results (segmentation
class maps and probabilities: a 1024 px tile with 21 class probabilities is 23 MiB, so 256 of
them would be 6 GiB) or its oldest tile waited :data:`CHUNK_SECONDS`, and
at :meth:`~BackgroundPartWriter.close` (end of predict, or an exception: what is queued is
still published). Few, large files keep the metadata load of a parallel filesystem low (one
chunk per rank per 5 s at most under load, unless 64 MiB of class maps come sooner) while a
crash loses at most 5 s of work; the byte bound keeps a rank's memory flat for any tile size,
class count and speed.

The queue is bounded (``max_pending`` batches and :data:`QUEUE_BYTES` of results, whichever is
reached first), which keeps memory flat: if the disk is slower than the GPUs the predict loop
blocks instead of piling results up. An error in the thread is re-raised in the caller at the
next :meth:`~BackgroundPartWriter.put` or at ``close``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

from mgpr.errors import MgprError, OutputError
from mgpr.outputs.parts import OutcomeLike, PartWriter

#: A chunk is published once it holds this many tiles ...
CHUNK_TILES = 256
#: ... or once its tiles' results hold this many bytes (:func:`held_bytes`) ...
CHUNK_BYTES = 64 * 2**20
#: ... or once its first tile waited this long, seconds.
CHUNK_SECONDS = 5.0
#: Results' bytes waiting in the queue (batches put while a chunk is being published) before
#: :meth:`BackgroundPartWriter.put` blocks; a batch larger than this alone still goes in.
QUEUE_BYTES = 64 * 2**20


def held_bytes(outcome: OutcomeLike) -> int:
    """Host bytes an outcome's result holds: its record's ``nbytes``.

    0 for records without one (a tile's boxes or classes, whose size the tile count bounds).
    """
    return int(getattr(getattr(outcome, "record", None), "nbytes", 0) or 0)


class BackgroundPartWriter:
    """Publishes a rank's outcomes in chunks on a thread (see the module docstring).

    Args:
        writer: the rank's part writer.
        on_write: optional ``(seconds, tiles)`` callback per published chunk (run report).
        max_pending: batches the queue holds before :meth:`put` blocks.
        max_pending_bytes: results' bytes the queue holds before :meth:`put` blocks.
        chunk_tiles: tiles per chunk.
        chunk_bytes: results' bytes per chunk (:func:`held_bytes`).
        chunk_seconds: longest wait of a finished tile before its chunk is published.
    """

    def __init__(
        self,
        writer: PartWriter,
        on_write: Callable[[float, int], None] | None = None,
        max_pending: int = 8,
        chunk_tiles: int = CHUNK_TILES,
        chunk_seconds: float = CHUNK_SECONDS,
        chunk_bytes: int = CHUNK_BYTES,
        max_pending_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.writer = writer
        self.on_write = on_write
        self.chunk_tiles = chunk_tiles
        self.chunk_bytes = chunk_bytes
        self.max_pending_bytes = max_pending_bytes
        self._queued_bytes = 0
        self._room = threading.Condition()
        self.chunk_seconds = chunk_seconds
        self.records = 0
        self.tiles = 0
        self.chunks = 0
        self._queue: queue.Queue[tuple[Sequence[OutcomeLike], int] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mgpr-part-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: list[OutcomeLike] = []
        pending_bytes = 0
        since = 0.0
        while True:
            due_at = since + self.chunk_seconds
            timeout = max(0.0, due_at - time.monotonic()) if pending else None
            try:
                got = self._queue.get(timeout=timeout)
            except queue.Empty:
                got = ((), 0)  # the chunk is due
            if got is None:
                self._publish(pending)
                return
            item, size = got
            if size:
                with self._room:
                    self._queued_bytes -= size
                    self._room.notify_all()
            if item:
                if not pending:
                    since = time.monotonic()
                pending.extend(item)
                pending_bytes += size
            due = time.monotonic() - since >= self.chunk_seconds
            full = len(pending) >= self.chunk_tiles or pending_bytes >= self.chunk_bytes
            if pending and (full or due):
                self._publish(pending)
                pending = []
                pending_bytes = 0

    def _publish(self, outcomes: list[OutcomeLike]) -> None:
        if not outcomes or self._error is not None:
            return
        try:
            start = time.perf_counter()
            self.records += self.writer.publish(outcomes)
            self.tiles += len(outcomes)
            self.chunks += 1
            if self.on_write is not None:
                self.on_write(time.perf_counter() - start, len(outcomes))
        except BaseException as exc:  # surfaced to the predict loop
            self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, MgprError):
                raise self._error
            from rasterio._err import CPLE_BaseError  # GDAL's own write errors (part GeoTIFFs)

            from mgpr.outputs.rundir import rerun

            again = rerun(self.writer.folder.parent)  # the run directory of parts/
            if isinstance(self._error, PermissionError):  # chmod, chattr +i, a read-only mount
                fix = (
                    f"make {self.writer.folder} writable for this user (ls -ld, lsattr), "
                    f"then {again}"
                )
            elif isinstance(self._error, (OSError, CPLE_BaseError)):
                fix = f"free disk space, then {again}"
            else:
                fix = (
                    "this is a bug in mgpr or in the model's records: please report it with "
                    "this line; finished tiles are kept and a re-run resumes"
                )
            raise OutputError(
                f"writing results to {self.writer.folder} failed ({type(self._error).__name__}: "
                f"{self._error}); {fix}"
            ) from self._error

    def put(self, outcomes: Sequence[OutcomeLike]) -> None:
        """Queue one batch (blocks while ``max_pending`` batches or ``max_pending_bytes`` wait)."""
        self._raise_if_failed()
        size = sum(held_bytes(o) for o in outcomes)
        with self._room:
            while (
                self._queued_bytes
                and self._queued_bytes + size > self.max_pending_bytes
                and self._thread.is_alive()
            ):
                self._room.wait(timeout=1.0)
            self._queued_bytes += size
        self._queue.put((outcomes, size))

    def close(self, raise_errors: bool = True) -> None:
        """Publish everything queued and stop the thread."""
        self._queue.put(None)
        self._thread.join()
        if raise_errors:
            self._raise_if_failed()
