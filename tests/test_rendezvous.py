"""Rank 0 decides, the others are told: two real gloo ranks joined early (as under ``srun``).

Two spawned processes join with :func:`join_early` (the address and port come from
``MASTER_ADDR``/``MASTER_PORT``, as Lightning's SLURMEnvironment reads them) and run one
:func:`decided` call per case, one after the other in the same group; each rank's outcome comes
back through a queue.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mgpr.errors import OutputError, RankJoinError
from mgpr.run.rendezvous import decided, join_early
from mgpr.run.shared_dir import check_one_run_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CASES = ("ok", "refuse", "bug", "private")


#: Run-directory checks after the decisions: one folder for both ranks, then node-local ones.
DIR_CASES = ("shared-dir", "node-local-dir")


def _rank_main(rank: int, port: int, out: Any, base: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    group = join_early(SimpleNamespace(ntasks=2, procid=rank), timeout_s=30)
    for case in CASES:  # one decision after another in the same group, as in a run
        calls: list[int] = []

        def decide(case: str = case, calls: list[int] = calls) -> Any:
            calls.append(rank)
            if case == "refuse":
                raise OutputError(
                    "output_dir='x' holds results of another run; pass overwrite=true"
                )
            if case == "bug":
                raise ValueError("something unexpected")
            return {"resume": True, "by": rank}

        try:
            value = decided(group, "the run directory's state", decide, share=case != "private")
            out.put((case, rank, "ok", value, calls))
        except Exception as exc:  # the test looks at the class and the line
            out.put((case, rank, type(exc).__name__, str(exc), calls))
    for case in DIR_CASES:
        # node-local: each rank's "same" path is a folder of its own, as /tmp on two nodes
        run_dir = Path(base, case, f"node{rank}" if case == "node-local-dir" else "")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_dir / ".mgpr-run.lock"
        token = f"token-{case}" if rank == 0 else None
        if rank == 0:
            lock.write_text(json.dumps({"token": token}))
        try:
            check_one_run_dir(group, run_dir, lock, token, wait_s=1.0)
            out.put((case, rank, "ok", None, []))
        except Exception as exc:
            out.put((case, rank, type(exc).__name__, str(exc), []))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, int], tuple[Any, ...]]:
    """Every case's outcome on both ranks: ``{(case, rank): (kind, value, calls)}``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    base = str(tmp_path_factory.mktemp("dirs"))
    procs = [ctx.Process(target=_rank_main, args=(r, port, out, base)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2 * (len(CASES) + len(DIR_CASES))):
        case, rank, *rest = out.get(timeout=120)
        got[(case, rank)] = tuple(rest)
    for p in procs:
        p.join(timeout=60)
    return got


def test_rank0_decides_once_and_every_rank_gets_its_answer(results) -> None:
    assert results[("ok", 0)] == ("ok", {"resume": True, "by": 0}, [0])
    assert results[("ok", 1)] == ("ok", {"resume": True, "by": 0}, [])  # rank 1 never decided


def test_rank0s_refusal_reaches_the_other_rank_as_the_same_line(results) -> None:
    r0, r1 = results[("refuse", 0)], results[("refuse", 1)]
    assert r0[0] == r1[0] == OutputError.__name__
    assert r0[1] == r1[1] and "overwrite=true" in r1[1] and r1[2] == []


def test_an_unexpected_failure_on_rank0_is_one_line_on_the_others(results) -> None:
    assert results[("bug", 0)][:2] == ("ValueError", "something unexpected")
    kind, line, _ = results[("bug", 1)]
    assert kind == RankJoinError.__name__
    assert "rank 0 failed while deciding the run directory's state" in line
    assert "ValueError: something unexpected" in line


def test_a_private_result_stays_on_rank0(results) -> None:
    assert results[("private", 0)][1] == {"resume": True, "by": 0}
    assert results[("private", 1)][:2] == ("ok", None)


def test_ranks_that_see_one_run_dir_go_on(results) -> None:
    assert results[("shared-dir", 0)][0] == results[("shared-dir", 1)][0] == "ok"


def test_a_node_local_run_dir_stops_every_rank_with_the_same_line(results) -> None:
    r0, r1 = results[("node-local-dir", 0)], results[("node-local-dir", 1)]
    assert r0[0] == r1[0] == OutputError.__name__
    assert r0[1] == r1[1]
    assert "is not one folder for every rank: rank 1 on " in r0[1]
    assert "put output_dir on a shared filesystem" in r0[1]


def test_no_group_decides_on_every_rank() -> None:
    """One rank, or ranks started by Lightning's launcher: the decision runs locally."""
    assert join_early(None, 5) is None
    assert join_early(SimpleNamespace(ntasks=1, procid=0), 5) is None
    assert decided(None, "x", lambda: 7) == 7
    with pytest.raises(OutputError):
        decided(None, "x", lambda: (_ for _ in ()).throw(OutputError("no")))
    check_one_run_dir(None, Path("/nonexistent"), Path("/nonexistent/lock"), None)  # no group


def test_a_join_cut_off_by_rank_0_is_not_called_a_timeout(tmp_path) -> None:
    """Ctrl-C to the launcher while rank 1 joins: its store connection breaks at once; the line
    said "not every rank joined within join_timeout_s=300 ... raise join_timeout_s"."""
    from types import SimpleNamespace

    import pytest
    import torch

    from mgpr.conf.schema import PredictConfig
    from mgpr.errors import RankJoinError
    from mgpr.run.trainer import _predict

    def cut_off(*args, **kwargs):
        raise torch.distributed.DistError("recvValue failed on SocketImpl: Broken pipe")

    trainer = SimpleNamespace(predict=cut_off, global_rank=1, world_size=2)
    with pytest.raises(RankJoinError) as refused:
        _predict(trainer, None, SimpleNamespace(store=None), PredictConfig(), tmp_path)
    line = str(refused.value)
    assert "rank 1: rank 0 went away while the 2 ranks joined (recvValue failed" in line
    assert "join_timeout_s" not in line
    assert f"re-run the same command with output_dir={tmp_path} to resume" in line


def test_each_srun_step_of_a_job_meets_at_its_own_port() -> None:
    """Lightning's port (15000 + the job id's last 4 digits) is every step's: two srun steps
    running at once in one job collided (EADDRINUSE)."""
    from mgpr.run.rendezvous import step_port

    ports = [step_port("4711", str(step)) for step in range(64)]
    assert len(set(ports)) == 64 and all(15000 <= p < 35000 for p in ports if p is not None)
    assert step_port("4711", "0") == step_port("4711", "0")  # every rank of a step agrees
    assert step_port("4712", "0") != step_port("4711", "0")
    assert step_port("", "0") is None and step_port("4711", "batch") is None


def test_a_port_in_use_is_named_not_called_a_timeout(monkeypatch) -> None:
    """The step's rendezvous port taken by another process: one line naming the port and
    MASTER_PORT, not "not every rank joined ... raise join_timeout_s"."""
    import socket

    from mgpr.errors import RankJoinError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        with pytest.raises(RankJoinError) as refused:
            join_early(SimpleNamespace(ntasks=2, procid=0, job_id="9", step_id="1"), 10)
    finally:
        holder.close()
    line = str(refused.value)
    assert f"port {port} on 127.0.0.1 is in use" in line and "MASTER_PORT" in line, line
    assert "join_timeout_s" not in line
