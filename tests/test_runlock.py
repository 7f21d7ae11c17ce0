"""One live run per output_dir: the O_EXCL lock, its heartbeat, and when it is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_mgpr_inprocess

from mgpr.errors import OutputError
from mgpr.outputs.runlock import LOCK_FILE, acquire_run_lock

HOST = socket.gethostname()


def _plant_lock(run_dir: Path, age_s: float = 0.0, **holder: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    data = {"host": HOST, "pid": os.getpid(), "slurm_job_id": None, "slurm_restart_count": "0"}
    data.update(holder)
    data["token"] = "planted"
    path.write_text(json.dumps(data))
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    lock = acquire_run_lock(tmp_path, {})
    try:
        with pytest.raises(OutputError, match=r"is in use by a live run \(host .*, pid \d+\)"):
            acquire_run_lock(tmp_path, {})
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(tmp_path, {}).release()  # free again


def test_the_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    lock = acquire_run_lock(tmp_path, {}, heartbeat_s=0.05)
    path = tmp_path / LOCK_FILE
    old = time.time() - 1000
    os.utime(path, (old, old))
    deadline = time.time() + 5
    while path.stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    refreshed = path.stat().st_mtime > old + 500
    lock.release()
    assert refreshed, "the heartbeat never touched the lock"


@pytest.mark.parametrize(
    ("holder", "age_s", "env"),
    [
        ({"pid": None}, 0.0, {}),  # pid filled in below: a process that has exited
        ({"host": "node-that-died"}, 1000.0, {}),  # heartbeat far too old
        (
            {"host": "other-node", "slurm_job_id": "77", "slurm_restart_count": "0"},
            0.0,
            {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"},
        ),  # our own job before its requeue
    ],
    ids=["dead-pid", "stale-heartbeat", "requeued-job"],
)
def test_a_dead_owner_is_taken_over(
    tmp_path: Path, holder: dict[str, object], age_s: float, env: dict[str, str]
) -> None:
    if holder.get("pid", 0) is None:
        holder = {**holder, "pid": _dead_pid()}
    _plant_lock(tmp_path, age_s=age_s, **holder)
    lock = acquire_run_lock(tmp_path, env)
    stored = json.loads((tmp_path / LOCK_FILE).read_text())
    assert stored["pid"] == os.getpid() and stored["token"] == lock.token
    lock.release()


def test_a_live_run_on_another_node_of_the_same_job_is_refused(tmp_path: Path) -> None:
    """Two srun steps of one job (same restart count) are two live runs."""
    _plant_lock(tmp_path, host="other-node", slurm_job_id="77", slurm_restart_count="0")
    with pytest.raises(OutputError, match="SLURM job 77"):
        acquire_run_lock(tmp_path, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"})


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    lock = acquire_run_lock(tmp_path, {})
    _plant_lock(tmp_path)  # someone took it over meanwhile
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "planted"


def test_the_cli_refuses_a_second_live_run_in_one_output_dir(
    make_image, tmp_path: Path, capsys
) -> None:
    img = make_image(width=128, height=128)
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "predictions.gpkg").write_bytes(b"the live run's output")
    live_log = "2026-12-08 [rank 0] INFO mgpr: the live run's own line\n"
    (run / "logs" / "rank0.log").write_text(live_log)
    _plant_lock(run, host=HOST, pid=os.getppid())  # a live process on this host
    rc = run_mgpr_inprocess(f"input_path={img.path}", "model=null", f"output_dir={run}")
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("mgpr: error:")]
    assert len(lines) == 1 and "is in use by a live run" in lines[0]
    assert (run / "predictions.gpkg").read_bytes() == b"the live run's output"
    assert json.loads((run / LOCK_FILE).read_text())["token"] == "planted"
    # the live run's log gets none of the refused run's lines (it read as the live run failing)
    assert (run / "logs" / "rank0.log").read_text() == live_log
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log"]
