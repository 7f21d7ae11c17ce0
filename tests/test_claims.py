"""Chunk claiming and the end of predict without a collective (no process group needed).

The store is torch's in-process ``HashStore``, the same API as the ``TCPStore`` of a real
process group (``add`` is atomic, ``check`` does not block); clocks are injected.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading

import psutil
import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpr.errors import RankJoinError
from mgpr.run.claims import (
    ChunkClaimBatchSampler,
    LocalCounter,
    StoreCounter,
    decode_remaining,
    encode_remaining,
    share_remaining,
    static_bounds,
)
from mgpr.run.liveness import (
    Heartbeat,
    LocalRanks,
    StoreTally,
    heartbeat_key,
    publish_done,
    wait_for_ranks,
)


def _drain_interleaved(samplers: list[ChunkClaimBatchSampler], order: list[int]) -> list[list[int]]:
    """Pull one batch at a time from the samplers in ``order`` (cycled), like racing ranks.

    ``order`` must name every sampler, so each is drained in the end.
    """
    iters = [iter(s) for s in samplers]
    got: list[list[int]] = [[] for _ in samplers]
    live = set(range(len(samplers)))
    for r in itertools.cycle(order):
        if not live:
            break
        if r in live:
            try:
                got[r].extend(next(iters[r]))
            except StopIteration:
                live.discard(r)
    return got


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 80),
    batch=st.integers(1, 5),
    order=st.lists(st.integers(0, 2), min_size=1, max_size=12),
)
def test_claimed_chunks_cover_every_tile_exactly_once(n: int, batch: int, order: list[int]) -> None:
    """Three ranks pulling at arbitrary relative speeds from one store counter."""
    store = dist.HashStore()
    samplers = [ChunkClaimBatchSampler(n, batch, StoreCounter(store)) for _ in range(3)]
    chunk = 2 * batch  # CHUNK_BATCHES
    got = _drain_interleaved(samplers, [*order, 0, 1, 2])
    assert sorted(i for g in got for i in g) == list(range(n))
    for g in got:  # a rank's tiles come in whole contiguous chunks (GDAL block cache)
        for k in {i // chunk for i in g}:
            whole = list(range(k * chunk, min(n, k * chunk + chunk)))
            assert [i for i in g if i // chunk == k] == whole
    assert sum(s.claimed_tiles for s in samplers) == n


def test_a_fast_rank_takes_more_chunks() -> None:
    """The rank that asks more often (cheap tiles, a faster GPU) simply does more."""
    store = dist.HashStore()
    fast, slow = (ChunkClaimBatchSampler(40, 2, StoreCounter(store)) for _ in range(2))
    got = _drain_interleaved([fast, slow], [0, 0, 0, 1])
    assert sorted(got[0] + got[1]) == list(range(40))
    assert len(got[0]) > 2 * len(got[1])


def test_single_process_reads_everything_in_order() -> None:
    sampler = ChunkClaimBatchSampler(11, 2, LocalCounter())
    assert list(sampler) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert sampler.claimed_chunks == 3 and sampler.claimed_tiles == 11


def test_batches_never_mix_band_counts() -> None:
    """Chunks are cut where the shape key changes (an RGB raster, then a 1-band one)."""
    keys = [3, 3, 3, 1, 1, 4]
    sampler = ChunkClaimBatchSampler(6, 2, LocalCounter(), chunk_batches=2, keys=keys)
    assert list(sampler) == [[0, 1], [2], [3], [4], [5]]
    with pytest.raises(ValueError, match="5 shape keys for 6 items"):
        ChunkClaimBatchSampler(6, 2, LocalCounter(), keys=keys[:5])


def test_static_split_is_the_old_contiguous_slices() -> None:
    assert [static_bounds(7, r, 2) for r in (0, 1)] == [(0, 4), (4, 7)]
    assert static_bounds(1, 1, 2) == (1, 1)
    sampler = ChunkClaimBatchSampler(7, 2, LocalCounter(), static_slice=(1, 2))
    assert list(sampler) == [[4, 5], [6]]
    with pytest.raises(ValueError, match="outside world size"):
        static_bounds(3, 2, 2)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 60), world=st.integers(1, 9))
def test_static_slices_cover_every_tile_exactly_once(n: int, world: int) -> None:
    bounds = [static_bounds(n, r, world) for r in range(world)]
    flat = [i for a, b in bounds for i in range(a, b)]
    assert flat == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_rank_0_decides_the_remaining_tiles_and_the_others_are_told() -> None:
    keys = [f"a.tif:{r}:{c}" for r in range(3) for c in range(5)]
    done = {keys[0], keys[7], keys[14], "other.tif:0:0"}
    store = dist.HashStore()
    calls: list[int] = []

    def done_set() -> set[str]:
        calls.append(1)
        return done

    told: dict[int, tuple[list[int], int]] = {}
    later = threading.Thread(target=lambda: told.update({1: share_remaining(keys, 1, store, None)}))
    later.start()  # rank 1 first: it waits for rank 0's decision
    told[0] = share_remaining(keys, 0, store, done_set)
    later.join(30)
    expected = [i for i in range(15) if i not in (0, 7, 14)]
    assert told[0] == told[1] == (expected, 3)
    assert calls == [1]  # only rank 0 read the done set


def test_a_rank_with_another_plan_is_refused() -> None:
    keys = ["a.tif:0:0", "a.tif:0:1"]
    payload = encode_remaining(keys, set())
    assert decode_remaining(keys, payload, 1) == [0, 1]
    with pytest.raises(RankJoinError, match="rank 1 planned other tiles than rank 0"):
        decode_remaining(["a.tif:0:0"], payload, 1)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_a_slow_rank_is_waited_for_however_long() -> None:
    """No timeout: rank 1 beats for an hour (of fake time), then publishes."""
    store = dist.HashStore()
    clock = _Clock()

    def sleep(s: float) -> None:
        clock.sleep(s)
        store.add(heartbeat_key(1), 1)  # alive
        if clock.t >= 3600:
            publish_done(store, 1)

    assert wait_for_ranks(store, 2, stale_s=60, clock=clock, sleep=sleep) == []
    assert clock.t >= 3600


def test_a_rank_without_heartbeat_is_dead_after_stale_s() -> None:
    store = dist.HashStore()
    clock = _Clock()
    publish_done(store, 2)
    dead = wait_for_ranks(store, 3, stale_s=60, clock=clock, sleep=clock.sleep)
    assert [r for r, _ in dead] == [1] and "no heartbeat for" in dead[0][1]
    assert 60 < clock.t < 62


def test_a_rank_that_failed_or_exited_is_reported_at_once() -> None:
    store = dist.HashStore()
    clock = _Clock()
    publish_done(store, 1, "RunInterrupted: SIGTERM")
    dead = wait_for_ranks(
        store, 3, exited=lambda r: 137 if r == 2 else None, clock=clock, sleep=clock.sleep
    )
    assert dead == [
        (1, "failed: RunInterrupted: SIGTERM"),
        (2, "its process exited with code 137 before it finished"),
    ]
    assert clock.t == 0.0


def test_a_rank_that_published_then_exited_is_fine() -> None:
    store = dist.HashStore()
    publish_done(store, 1)
    assert wait_for_ranks(store, 2, exited=lambda r: 0) == []


def test_heartbeat_beats_until_stopped() -> None:
    store = dist.HashStore()
    beat = Heartbeat(store, 3, interval_s=0.01)
    deadline = 200
    while int(store.add(heartbeat_key(3), 0)) < 3 and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    beat.stop()
    stopped = int(store.add(heartbeat_key(3), 0))
    threading.Event().wait(0.05)
    assert stopped >= 3 and int(store.add(heartbeat_key(3), 0)) == stopped


def test_progress_counts_every_rank_of_this_run_only() -> None:
    store = dist.HashStore()
    clock = _Clock()
    ranks = [StoreTally(flush_s=1.0, clock=clock) for _ in range(2)]
    single = StoreTally()
    single.add(5)
    assert single.total() == 5  # no store: this process's own count
    for tally in ranks:
        tally.attach(store)
    ranks[0].add(4)
    ranks[1].add(3)
    assert ranks[0].total() == 0  # batched: nothing sent within flush_s
    clock.t = 2.0
    ranks[0].add(1)
    assert ranks[1].total() == 5
    ranks[1].flush()
    assert ranks[0].total() == 8


def test_stopping_local_ranks_leaves_no_process(tmp_path) -> None:
    """A child that ignores SIGTERM, with a grandchild (its DataLoader worker), is killed."""
    script = tmp_path / "child.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stubborn = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "ready"
    family = [*psutil.Process(stubborn.pid).children(recursive=True)]

    class Launcher:
        procs = [polite, stubborn]

    ranks = LocalRanks()
    launcher = Launcher()
    ranks.adopt(launcher, 0)
    assert launcher.procs == []  # Lightning's observer no longer sees them
    assert ranks.exit_code(1) is None and ranks.exit_code(3) is None
    killed = ranks.stop(grace_s=1.0)
    assert killed == [stubborn.pid]
    assert polite.returncode is not None and stubborn.returncode is not None
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []
