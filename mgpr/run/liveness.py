"""The end of predict without a timed collective: done keys, heartbeats and the local ranks.

Why: a ``barrier()`` after predict runs under the process group's timeout, so a rank that is
merely slower than another (more tiles, a slower GPU) "failed"; with NCCL the watchdog aborts
the process instead. Waiting for a slow rank is never a failure here. Instead:

* each rank sets ``mgpr/done/<rank>`` in the process group's store when its tiles are
  published (:func:`publish_done`);
* each rank bumps ``mgpr/hb/<rank>`` every :data:`HEARTBEAT_S` seconds from a thread
  (:class:`Heartbeat`), work or no work;
* rank 0 polls those keys (:func:`wait_for_ranks`) and waits as long as every missing rank is
  alive: a rank is dead when its process has exited (the local ranks Lightning's launcher
  started, see :class:`LocalRanks`) or when its heartbeat has not moved for
  :data:`STALE_S` seconds (a rank on another node killed without ``srun`` noticing, a hung
  node). ``join_timeout_s`` only bounds the joining at start.

No collective runs after predict, so the process group's backend (gloo, even on GPUs) never
times out a run, and the store's own timeout only applies to blocking ``get``/``wait`` calls,
which are not used here.

:class:`LocalRanks` also makes sure no rank outlives the process that launched it: stopping the
launcher (SIGTERM, SIGINT) stops its child ranks (SIGTERM, so each keeps what it published; then
SIGKILL of whatever is left, DataLoader workers included).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from mgpr.outputs.rundir import rerun

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
"""Seconds between a rank's heartbeats."""

STALE_S = 60.0
"""A rank whose heartbeat has not moved for this long is dead (seconds). Generous: the heartbeat
is a thread of its own, so only a dead, frozen or unreachable process misses it this long."""

POLL_S = 0.5
"""Seconds between rank 0's looks at the done keys."""

STOP_GRACE_S = 10.0
"""Seconds a stopped child rank gets to flush its published work before it is killed."""

START_ERROR_GRACE_S = 2.0
"""Seconds the start-up watch waits after a child's failure before it speaks for rank 0."""

STOPPED_CODES = frozenset({130, 143, -int(signal.SIGINT), -int(signal.SIGTERM)})
"""Exit codes of a process stopped by SIGINT / SIGTERM (its own handler: 130; death by the
signal: minus it; 128 + the signal through a shell)."""


def done_key(rank: int) -> str:
    """Store key a rank sets once its tiles are published."""
    return f"mgpr/done/{rank}"


def heartbeat_key(rank: int) -> str:
    """Store key (a counter) a rank's heartbeat thread increments."""
    return f"mgpr/hb/{rank}"


DONE_OK = b"ok"


def publish_done(store: Any, rank: int, failure: str | None = None) -> None:
    """Tell rank 0 this rank has ended: its tiles are all published, or why it stopped.

    Best effort for a failure (the store may be gone with rank 0).
    """
    value = DONE_OK if failure is None else ("failed: " + failure[:300]).encode()
    try:
        store.set(done_key(rank), value)
    except Exception:
        if failure is None:
            raise


class Heartbeat:
    """A daemon thread that increments ``mgpr/hb/<rank>`` every ``interval_s`` seconds.

    It stops quietly when the store goes away (rank 0 ended): the rank's own store calls report
    that instead.

    Args:
        store: the process group's store; cloned (its own connection) where the store can.
        rank: global rank.
        interval_s: seconds between beats.
    """

    def __init__(self, store: Any, rank: int, interval_s: float = HEARTBEAT_S) -> None:
        clone = getattr(store, "clone", None)
        try:
            self.store = clone() if callable(clone) else store
        except Exception:  # noqa: BLE001 - a store that cannot clone is shared (it is locked)
            self.store = store
        self.key = heartbeat_key(rank)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.store.add(self.key, 1)  # the first beat before predict starts
        self._thread = threading.Thread(
            target=self._run, name=f"mgpr-heartbeat-{rank}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: nobody is listening
                return

    def stop(self) -> None:
        """Stop beating (idempotent)."""
        self._stop.set()
        self._thread.join(timeout=5.0)


def wait_for_ranks(
    store: Any,
    world_size: int,
    *,
    exited: Callable[[int], int | None] = lambda rank: None,
    key: Callable[[int], str] = done_key,
    stale_s: float = STALE_S,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[tuple[int, str]]:
    """Wait (rank 0) until every rank has published, or some missing rank is dead.

    Never gives up on a rank that is alive, however long it takes.

    Args:
        store: the process group's store.
        world_size: number of ranks.
        exited: exit code of a rank's process if rank 0 can see it has ended, else None
            (the local child ranks; None for ranks rank 0 does not supervise).
        key: the store key each rank sets when it is done (:func:`done_key`: its tiles).
        stale_s: seconds without a heartbeat after which a rank is dead.
        poll_s: seconds between looks.
        clock: monotonic seconds (injectable for tests).
        sleep: sleeps that many seconds (injectable for tests).

    Returns:
        ``(rank, why)`` for every rank that failed or was found dead before it published its
        tiles; empty when every rank published.
    """
    missing = set(range(1, world_size))
    beats: dict[int, tuple[int, float]] = {}
    while missing:
        now = clock()
        dead: list[tuple[int, str]] = []
        for rank in sorted(missing):
            if store.check([key(rank)]):
                value = bytes(store.get(key(rank)))
                missing.discard(rank)
                if value != DONE_OK:
                    dead.append((rank, value.decode(errors="replace")))
                continue
            why = None
            code = exited(rank)
            if code is not None:
                why = f"its process exited with code {code} before it finished"
            else:
                beat = int(store.add(heartbeat_key(rank), 0))
                last = beats.get(rank)
                if last is None or beat != last[0]:
                    beats[rank] = (beat, now)
                elif now - last[1] > stale_s:
                    why = f"no heartbeat for {now - last[1]:.0f} s"
            if why is not None and not store.check([key(rank)]):
                dead.append((rank, why))  # else it published just before it ended: next look
        if dead:
            return dead
        if missing:
            sleep(poll_s)
    return []


class LocalRanks:
    """The child ranks Lightning's subprocess launcher started on this node (rank 0 only).

    Lightning starts local ranks 1..N-1 with ``subprocess.Popen`` and watches them from a thread
    that SIGKILLs rank 0 itself as soon as one exits non-zero, even when rank 0 stopped them on
    purpose (a forwarded SIGTERM exits 130), and that never notices rank 0 being stopped. mgpr
    takes the processes over from that list (:meth:`adopt`; the thread then ends) and supervises
    them itself: rank 0 forwards a stop, waits for their exit and reports a dead one.
    """

    def __init__(self) -> None:
        self.procs: list[Any] = []  # subprocess.Popen; procs[i] is global rank first + i + 1
        self.first = 0  # global rank of the process that launched them
        self._launcher: Any = None
        self._started: threading.Event | None = None

    def adopt(self, launcher: Any, global_rank: int) -> None:
        """Take the child processes over from Lightning's launcher (no-op without one)."""
        procs = getattr(launcher, "procs", None)
        self._launcher = launcher
        self.first = global_rank
        if isinstance(procs, list) and procs:
            self.procs = list(procs)
            procs.clear()  # Lightning's observer watches this very list: it now sees none

    def adopt_at_launch(self, launcher: Any, run_dir: Path, poll_s: float = POLL_S) -> None:
        """Adopt the children the moment ``launcher`` starts them, and watch the start-up.

        Lightning's observer SIGKILLs rank 0 itself when a child exits non-zero, and until
        :meth:`adopt` (in the data module's setup, after every rank joined) a rank dying at
        start-up ended the run with exit 137 and not a word. Adopted at launch, a child that
        dies before :meth:`started` is said in one line, the others are stopped, and rank 0
        exits 2 (it is blocked in the process group's join, which no signal interrupts).
        No-op without a launcher that starts processes (srun, one rank).
        """
        call = getattr(launcher, "_call_children_scripts", None)
        if call is None:
            return
        self._started = threading.Event()

        def call_and_adopt() -> None:
            call()
            environment = getattr(launcher, "cluster_environment", None)
            first = environment.global_rank() if environment is not None else 0
            self.adopt(launcher, int(first))
            threading.Thread(
                target=self._watch_start,
                args=(run_dir, poll_s),
                name="mgpr-start-watch",
                daemon=True,
            ).start()

        launcher._call_children_scripts = call_and_adopt

    def started(self) -> None:
        """Every rank joined: a child's exit is now the liveness checks' to report."""
        event = getattr(self, "_started", None)
        if event is not None:
            event.set()

    def _watch_start(self, run_dir: Path, poll_s: float) -> None:
        assert self._started is not None
        while not self._started.wait(poll_s):
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or code == 0 or self._started.is_set():
                    continue
                rank = self.first + i + 1
                stopped = code in STOPPED_CODES  # Ctrl-C / SIGTERM reached the child too
                # Rank 0 may be failing itself (its children then lose it and exit): once its
                # error reaches stop() the event is set and its own line is the one to say.
                if self._started.wait(STOP_GRACE_S if stopped else START_ERROR_GRACE_S):
                    return
                self.stop(grace_s=5.0)
                self._exit_at_start(run_dir, rank, code, stopped)

    def _exit_at_start(self, run_dir: Path, rank: int, code: int, stopped: bool) -> None:
        """One line on stderr and in the log, then exit: rank 0 is blocked in the join."""
        import os
        import sys

        from mgpr.run.logs import to_log_files

        if stopped:
            line = (
                f"mgpr: interrupted: rank {rank} was stopped (exit code {code}) while the ranks "
                f"started; the other ranks were stopped; {rerun(run_dir)}"
            )
        else:
            line = (
                f"mgpr: error: rank {rank} exited with code {code} while the ranks started "
                f"(killed, out of memory, or an error: read {run_dir}/logs/rank{rank}.log); "
                f"the other ranks were stopped; {rerun(run_dir)}"
            )
        print(line, file=sys.stderr, flush=True)
        to_log_files(line)
        logging.shutdown()
        os._exit(130 if stopped else 2)

    def _all(self) -> list[Any]:
        if self.procs:
            return self.procs
        procs = getattr(self._launcher, "procs", None)  # started but not adopted yet
        return list(procs) if isinstance(procs, list) else []

    def exit_code(self, global_rank: int) -> int | None:
        """Exit code of the child that is ``global_rank`` if it has ended, else None."""
        procs = self._all()
        i = global_rank - self.first - 1
        if 0 <= i < len(procs):
            return procs[i].poll()  # type: ignore[no-any-return]
        return None

    def stop(self, grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> list[int]:
        """Stop every child still running: ``sig``, ``grace_s`` seconds, then SIGKILL its tree.

        Returns the pids that had to be killed.
        """
        self.started()  # rank 0 stops them itself: the start-up watch says nothing
        procs = [p for p in self._all() if p.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        killed: list[int] = []
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: still running
                killed.append(proc.pid)
                _kill_tree(proc.pid)
                try:
                    proc.wait(timeout=5.0)
                except Exception:  # noqa: BLE001
                    pass
        return killed

    def reap(self, timeout_s: float) -> dict[int, int | None]:
        """Wait up to ``timeout_s`` s for the children to exit; exit code by global rank."""
        deadline = time.monotonic() + timeout_s
        codes: dict[int, int | None] = {}
        for i, proc in enumerate(self._all()):
            rank = self.first + i + 1
            try:
                codes[rank] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still running after it published
                codes[rank] = None
        return codes


def end_of_predict(
    rank: int,
    world_size: int,
    store: Any,
    local_ranks: LocalRanks,
    stop_heartbeat: Callable[[], None],
    run_dir: Path,
    finalise: Callable[[int], object] | None = None,
    on_all_done: Callable[[], None] | None = None,
) -> None:
    """After a rank's predict: publish its end; rank 0 waits for every rank while it is alive.

    ``on_all_done``: called on rank 0 once every rank has published its end (the final
    progress line, with the job's count), before the merge shares.

    No collective and no timeout: a slow rank is waited for; a dead one (its process exited,
    it reported a failure, or its heartbeat stopped) fails the run with the rank named. With
    ``finalise`` (a rank's share of the merge, :mod:`mgpr.run.merge_share`) every rank then
    finalises its rasters, rank 0 once it knows every rank's tiles are published.

    Raises:
        RankFailedError: on rank 0, when some rank ended without publishing its tiles.
    """
    import torch.distributed as dist

    from mgpr.errors import RankFailedError
    from mgpr.run.merge_share import merge_share_others, merge_share_rank0, skip_merge

    if rank != 0:
        publish_done(store, rank)
        if finalise is not None:
            merge_share_others(store, rank, finalise)
        stop_heartbeat()
        dist.destroy_process_group()
        return
    dead = wait_for_ranks(store, world_size, exited=local_ranks.exit_code)
    if dead:
        skip_merge(store)
        which = "; ".join(f"rank {r}: {why}" for r, why in dead)
        raise RankFailedError(
            f"rank 0 finished its tiles but not every rank did ({which[:300]}); every "
            f"finished tile is kept in {run_dir}/parts: read {run_dir}/logs/rank*.log, then "
            f"{rerun(run_dir)}"
        )
    if on_all_done is not None:
        on_all_done()
    if finalise is not None:
        merge_share_rank0(store, world_size, local_ranks.exit_code, finalise, run_dir)
    for child, code in local_ranks.reap(timeout_s=30.0).items():
        if code != 0:
            log.warning(
                "local rank process %d published all its tiles but %s",
                child,
                "is still running" if code is None else f"exited with code {code}",
            )
    dist.destroy_process_group()


PROGRESS_KEY = "mgpr/progress"


class StoreTally(pl.Callback):
    """Tiles predicted this run by every rank, summed in the store: the progress count.

    Each rank adds its batches' tiles (at most once per ``flush_s`` seconds, and at the end);
    rank 0's progress display reads the sum. No rank reads another's files during the run,
    and a resume's earlier tiles are not counted (tiles/s and ETA are this run's). Without a
    store (one process) the count is this process's own.
    """

    def __init__(self, flush_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.flush_s = flush_s
        self.clock = clock
        self.store: Any = None
        self.local = 0
        self.pending = 0
        self.last = clock()

    def attach(self, store: Any) -> None:
        """Count in ``store`` from now on (a clone of its own where the store can)."""
        clone = getattr(store, "clone", None)
        try:
            self.store = clone() if callable(clone) else store
        except Exception:  # noqa: BLE001 - a store that cannot clone is shared (it is locked)
            self.store = store

    def add(self, n: int) -> None:
        """Count ``n`` more tiles of this rank."""
        self.local += n
        self.pending += n
        if self.store is not None and self.clock() - self.last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Send the tiles counted since the last flush."""
        self.last = self.clock()
        if self.store is not None and self.pending:
            pending, self.pending = self.pending, 0
            self.store.add(PROGRESS_KEY, pending)

    def total(self) -> int:
        """Tiles of the whole run so far (all ranks; this process's own without a store)."""
        if self.store is None:
            return self.local
        return int(self.store.add(PROGRESS_KEY, 0))

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the batch's tiles."""
        self.add(len(batch["index"]))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Send what is left, so the final count is complete."""
        self.flush()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (its DataLoader workers)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.Error:
            pass
