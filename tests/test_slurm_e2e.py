"""mgpr itself under a real (local) SLURM cluster, through ``jobs/job.slurm``: the demo's sbatch
line on fake GPUs, misconfigurations refused before any rank starts, ``scancel --signal=TERM``
then a resumed resubmission, a real preemption (``high`` partition) that requeues the job, and
two nodes. Every run must hold every planned tile exactly once.

Skipped with a reason when no cluster answers; start one with ``bash scripts/slurm/ci-setup.sh``
(the preemption and two-node tests need ``--nodes 2`` and the ``high`` partition of start.sh).
Each mgpr rank pays ~10 s of torch + Lightning import, so images are tiny (512 px, 25 tiles).

Interruptions are deterministic, not timed: the runs to interrupt use ``gate_model.py`` (written
into the submit dir, on PYTHONPATH), the reference detector that stops after ``GATE_AFTER``
batches per rank until the file ``GATE_FILE`` exists. The test waits until every rank has
written exactly that many tiles, signals, and opens the gate only for the run that must finish.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from slurm_helpers import (
    REPO,
    TERMINAL_STATES,
    SlurmJob,
    cluster_nodes,
    job_state,
    require_slurm,
    sbatch_wait,
    slurm_env,
    wait_for_nodes,
)

pytestmark = pytest.mark.slurm

JOB = REPO / "jobs" / "job.slurm"
MGPR_BIN = str(Path(sys.executable).parent / "mgpr")
TILE, OVERLAP, SIZE = 128, 32, 512  # 5 x 5 = 25 tiles
GATE_AFTER = 2  # batches (of 1 tile) each rank predicts before it waits at the gate
COMMON = (f"tile_size={TILE}", f"overlap={OVERLAP}", "progress=false")
JOB_TIMEOUT = 300.0

GATE_MODEL = '''
"""The reference detector; with GATE_AFTER=N it waits after N batches until GATE_FILE exists."""
import os
import time
from pathlib import Path

from mgpr.models.reference import build_reference


def build(weights="none"):
    adapter = build_reference("none")
    after = int(os.environ.get("GATE_AFTER", "-1"))
    gate = Path(os.environ.get("GATE_FILE", "gate.open"))
    forward, calls = adapter.forward, [0]

    def gated(inputs):
        calls[0] += 1
        while 0 <= after < calls[0] and not gate.exists():
            time.sleep(0.05)
        return forward(inputs)

    adapter.forward = gated
    return adapter
'''


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A submit dir outside the repository: a 25-tile image, gate_model.py, slurm_logs/."""
    require_slurm()
    from mgpr.testimage import TestImageSpec, write_test_image

    root = tmp_path_factory.mktemp("submit")
    (root / "slurm_logs").mkdir()
    spec = TestImageSpec(
        width=SIZE,
        height=SIZE,
        objects=6,
        tile_size=TILE,
        overlap=OVERLAP,
        object_max_px=OVERLAP,
        seed=3,
    )
    write_test_image(root / "ortho.tif", spec)
    (root / "gate_model.py").write_text(GATE_MODEL)
    return root


def _env(submit: Path, **extra: str) -> dict[str, str]:
    return slurm_env({"MGPR_BIN": MGPR_BIN, "PYTHONPATH": str(submit), **extra})


def _planned_keys(input_path: str) -> set[str]:
    """Tile keys of the plan; keys hold ``input_path`` as given (relative to the submit dir)."""
    from mgpr.geo.tiling import plan_tiles

    return {t.id.key() for t in plan_tiles(input_path, SIZE, SIZE, TILE, OVERLAP)}


def _part_rows(run_dir: Path) -> tuple[list[str], list[tuple[Any, ...]], dict[int, int]]:
    """(tile keys of every published part, with repeats; detections rounded and sorted; tiles
    per rank)."""
    import pyarrow.parquet as pq

    from mgpr.outputs.parts import RECORDS_SUFFIX, parts_dir
    from mgpr.outputs.parts_read import list_parts, read_manifests

    keys: list[str] = []
    records: list[tuple[Any, ...]] = []
    per_rank: dict[int, int] = {}
    for part in list_parts(run_dir):
        part_keys = read_manifests(run_dir, [part])["tile_key"].to_pylist()
        if f"{part.name}{RECORDS_SUFFIX}" in part.files:
            table = pq.read_table(parts_dir(run_dir) / f"{part.name}{RECORDS_SUFFIX}")
            records += [
                (
                    r["tile_key"],
                    *(round(r[c], 6) for c in ("x0", "y0", "x1", "y1", "score")),
                    r["label"],
                )
                for r in table.to_pylist()
            ]
        keys += part_keys
        rank = int(part.name.split("-")[0].removeprefix("r"))
        per_rank[rank] = per_rank.get(rank, 0) + len(part_keys)
    return keys, sorted(records), per_rank


def _written(run_dir: Path) -> int:
    from mgpr.outputs.parts_read import count_written_tiles

    return count_written_tiles(run_dir)


def _submit(submit: Path, *args: str, env: dict[str, str], script: Path = JOB) -> str:
    """sbatch without waiting; ``args`` starting with ``-`` are sbatch flags, the rest overrides."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--output=slurm_logs/%j.out",
            "--error=slurm_logs/%j.err",
            *flags,
            str(script),
            *overrides,
        ],
        cwd=submit,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, f"sbatch refused: {proc.stderr.strip()}"
    return proc.stdout.strip().split(";")[0]


def _show(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        env=slurm_env(),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


def _wait(what: str, done: Callable[[], bool], job_id: str, timeout: float = JOB_TIMEOUT) -> None:
    """Poll ``done`` every 0.2 s; fail (cancelling the job) when it never comes true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=slurm_env(), timeout=10)
            pytest.fail(
                f"{what}: not within {timeout:.0f} s (job {job_id} cancelled)\n{_show(job_id)}"
            )
        time.sleep(0.2)


def _finished(submit: Path, job_id: str) -> SlurmJob:
    state: list[tuple[str, int | None]] = []

    def terminal() -> bool:
        state[:] = [job_state(job_id, slurm_env())]
        return state[0][0] in TERMINAL_STATES

    _wait(f"job {job_id} to end", terminal, job_id)
    logs = submit / "slurm_logs"
    rc = state[0][1]
    return SlurmJob(
        job_id,
        -1 if rc is None else rc,
        state[0][0],
        logs / f"{job_id}.out",
        logs / f"{job_id}.err",
    )


def _logs(submit: Path, job_id: str, run_dir: Path) -> str:
    """The job's .out/.err and every rank log of ``run_dir``, for a failure message."""
    paths = [submit / "slurm_logs" / f"{job_id}.{ext}" for ext in ("out", "err")]
    paths += sorted((run_dir / "logs").glob("rank*.log"))
    return "\n".join(
        f"--- {p} ---\n{p.read_text(errors='replace')[-4000:]}" for p in paths if p.is_file()
    )


def _wait_gated(run_dir: Path, job_id: str, ranks: int, submit: Path) -> None:
    """Until every rank has written its GATE_AFTER tiles and waits at the gate."""

    def gated() -> bool:
        state, _ = job_state(job_id, slurm_env())
        if state in TERMINAL_STATES:
            pytest.fail(
                f"job {job_id} ended ({state}) before reaching the gate\n{_show(job_id)}\n"
                f"{_logs(submit, job_id, run_dir)}"
            )
        return _written(run_dir) == ranks * GATE_AFTER

    _wait(f"{ranks} ranks to write {GATE_AFTER} tiles each", gated, job_id)


@pytest.fixture(scope="module")
def baseline(submit_dir: Path) -> dict[str, Any]:
    """The original demo's line, uninterrupted; the reference for every other run.

    ``export NUM_GPUS=2; sbatch --ntasks-per-node=$NUM_GPUS --gpus=$NUM_GPUS jobs/job.slurm ...``
    from a directory that is not the repository and without MGPR_BIN: job.slurm finds mgpr in the
    virtualenv active at submit time.
    """
    env = slurm_env({"VIRTUAL_ENV": str(Path(sys.executable).parent.parent)})
    env.pop("MGPR_BIN", None)
    job = sbatch_wait(
        JOB,
        "--ntasks-per-node=2",
        "--gpus=2",
        cwd=submit_dir,
        env=env,
        script_args=("input_path=ortho.tif", "model=reference", "workers=0", *COMMON),
        timeout=JOB_TIMEOUT,
    )
    run_dir = submit_dir / "runs" / f"slurm-{job.job_id}"
    keys, records, per_rank = _part_rows(run_dir)
    return {"job": job, "run_dir": run_dir, "keys": keys, "records": records, "per_rank": per_rank}


def test_demo_line_two_cpu_ranks_on_fake_gpus(submit_dir: Path, baseline: dict[str, Any]) -> None:
    job: SlurmJob = baseline["job"]
    assert (job.returncode, job.state) == (0, "COMPLETED"), job.describe()
    assert f"{Path(sys.executable).parent}/mgpr" in job.out, job.describe()
    assert "GPUs:           2 per node (CUDA_VISIBLE_DEVICES=0,1)" in job.out
    for rank in (0, 1):  # SLURM set CUDA_VISIBLE_DEVICES; torch sees no GPU: a clear line each
        assert (
            f"[rank {rank}] CUDA_VISIBLE_DEVICES=0,1 is set but torch sees no GPU: running "
            "on CPU ranks (gloo)"
        ) in job.err, job.describe()
    keys = baseline["keys"]
    assert len(keys) == len(set(keys)) == 25, job.describe()
    assert set(keys) == _planned_keys("ortho.tif")
    # Both ranks ran; they claim chunks as they go, so any split of the 25 tiles.
    per_rank = baseline["per_rank"]
    assert set(per_rank) == {0, 1} and min(per_rank.values()) > 0 and sum(per_rank.values()) == 25
    assert baseline["records"], "the reference detector found none of the planted objects"
    summary = json.loads((baseline["run_dir"] / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"]) == (2, 1)
    assert (summary["tiles_total"], summary["tiles_predicted"]) == (25, 25)


MISCONFIGURED = {
    "gpus=1 with 2 tasks per node": (
        ("--ntasks-per-node=2", "--gpus=2"),
        ("gpus=1", "workers=0"),
        "gpus=1 but sbatch --ntasks-per-node=2: submit with --ntasks-per-node=1",
    ),
    "--ntasks without --ntasks-per-node": (
        ("--ntasks=2", "--gpus=2"),
        ("workers=0",),
        "without --ntasks-per-node, so ranks per node are unknown: submit with "
        "--ntasks-per-node=N instead of --ntasks",
    ),
    "workers above --cpus-per-task": (
        ("--ntasks-per-node=2", "--gpus=2", "--cpus-per-task=2"),
        ("workers=3",),
        "workers=3 but sbatch --cpus-per-task=2: submit with --cpus-per-task=4, or set workers=1",
    ),
}


def test_misconfigurations_fail_before_any_rank_starts(submit_dir: Path) -> None:
    env = _env(submit_dir)
    jobs = {
        name: _submit(
            submit_dir,
            *flags,
            "input_path=ortho.tif",
            "model=reference",
            *overrides,
            *COMMON,
            env=env,
        )
        for name, (flags, overrides, _) in MISCONFIGURED.items()
    }
    for name, job_id in jobs.items():
        job = _finished(submit_dir, job_id)
        expected = MISCONFIGURED[name][2]
        assert (job.returncode, job.state) == (2, "FAILED"), f"{name}\n{job.describe()}"
        assert job.err.splitlines() == [job.err.strip()], f"{name}: not one line\n{job.err}"
        assert job.err.startswith("mgpr: error: ") and expected in job.err, f"{name}\n{job.err}"
        # The batch shell's preflight refused it: srun never started a rank (no run dir).
        assert not (submit_dir / "runs" / f"slurm-{job_id}").exists(), name


def test_scancel_term_then_resubmit_resumes(submit_dir: Path, baseline: dict[str, Any]) -> None:
    run_dir = submit_dir / "interrupted"
    gate = submit_dir / "term.gate"
    env = _env(submit_dir, GATE_AFTER=str(GATE_AFTER), GATE_FILE=str(gate))
    args = (
        "--ntasks-per-node=2",
        "--gpus=2",
        "input_path=ortho.tif",
        "model=gate_model:build",
        "workers=1",
        "batch_size=1",
        f"output_dir={run_dir}",
        *COMMON,
    )
    first = _submit(submit_dir, *args, env=env)
    _wait_gated(run_dir, first, ranks=2, submit=submit_dir)
    subprocess.run(["scancel", "--signal=TERM", first], env=env, check=True, timeout=10)
    job = _finished(submit_dir, first)
    # Every task (and its DataLoader worker) got TERM: both ranks stop cleanly with 130.
    assert (job.returncode, job.state) == (130, "FAILED"), job.describe()
    assert "mgpr: interrupted by SIGTERM; every finished tile is kept" in job.err, job.describe()
    assert "Traceback" not in job.err, job.describe()
    keys, _, per_rank = _part_rows(run_dir)
    assert per_rank == {0: GATE_AFTER, 1: GATE_AFTER} and len(set(keys)) == 2 * GATE_AFTER
    # How the run went until the stop: both tasks' figures, neither counted as failed.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["interrupted_ranks"] == [0, 1], report
    assert report["missing_ranks"] == report["failed_ranks"] == [], report
    assert report["context"]["unfinished"].startswith("interrupted by SIGTERM"), report

    gate.touch()
    again = sbatch_wait(
        JOB, *args[:2], cwd=submit_dir, env=env, script_args=args[2:], timeout=JOB_TIMEOUT
    )
    assert (again.returncode, again.state) == (0, "COMPLETED"), again.describe()
    assert "resuming the run" in again.err, again.describe()
    keys, records, _ = _part_rows(run_dir)
    assert sorted(keys) == sorted(baseline["keys"]), "tiles lost or doubled by the resume"
    assert records == baseline["records"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["tiles_predicted"], summary["world_size"]) == (25, 2)
    report = json.loads((run_dir / "report.json").read_text())  # the resume's own, whole
    assert report["interrupted_ranks"] == [] and "unfinished" not in report["context"]
    assert sum(r["tiles"] for r in report["ranks"]) == 25 - 2 * GATE_AFTER


def _submit_gated(submit: Path, gate: str, *overrides: str, partition: str | None = None) -> str:
    """A 2-rank job of the gate model (each rank stops after GATE_AFTER tiles until ``gate``)."""
    env = _env(submit, GATE_AFTER=str(GATE_AFTER), GATE_FILE=str(submit / gate))
    flags = [f"--partition={partition}"] if partition else []
    return _submit(
        submit,
        *flags,
        "--ntasks-per-node=2",
        "--gpus=2",
        "input_path=ortho.tif",
        "model=gate_model:build",
        "workers=0",
        "batch_size=1",
        *overrides,
        *COMMON,
        env=env,
    )


def _task_pid(job_id: str, procid: int) -> int | None:
    """The pid of task ``procid`` of the job's step (its SLURM_PROCID), on this machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={procid}".encode()}
        if wanted <= set(env) and b"SLURM_STEP_ID=0" in env and b"mgpr" in cmd:
            if b"multiprocessing" not in cmd and b"--slurm-preflight" not in cmd:
                return int(proc.name)
    return None


def test_a_sigkilled_task_ends_the_job_with_the_resume_line(
    submit_dir: Path, baseline: dict[str, Any]
) -> None:
    """--kill-on-bad-exit kills every task when one is SIGKILLed (out of memory): no mgpr line
    said where the finished tiles were; the job script says it."""
    run_dir = submit_dir / "killed"
    job_id = _submit_gated(submit_dir, "kill.gate", f"output_dir={run_dir}")
    _wait_gated(run_dir, job_id, ranks=2, submit=submit_dir)
    pid = _task_pid(job_id, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    job = _finished(submit_dir, job_id)
    assert job.returncode not in (0, 2, 130), job.describe()
    assert f"every finished tile is kept: resubmit the same command with output_dir={run_dir}" in (
        job.err
    ), job.describe()
    keys, _, _ = _part_rows(run_dir)
    assert len(keys) == len(set(keys)) >= 2 * GATE_AFTER  # kept, each once


def test_preemption_requeues_and_the_job_finishes(
    submit_dir: Path, baseline: dict[str, Any]
) -> None:
    nodes = cluster_nodes("high")
    if not nodes:
        pytest.skip("no 'high' partition: start the cluster with scripts/slurm/start.sh")
    gate = submit_dir / "preempt.gate"
    low = _submit_gated(submit_dir, gate.name, partition="debug")
    run_dir = submit_dir / "runs" / f"slurm-{low}"
    _wait_gated(run_dir, low, ranks=2, submit=submit_dir)
    node = re.search(r"\bNodeList=(\S+)", _show(low))
    assert node is not None
    high_script = submit_dir / "high.sh"
    high_script.write_text("#!/bin/bash\necho high ran on $SLURMD_NODENAME\n")
    # Needs the whole node our job holds: partition_prio preempts it (PreemptMode=REQUEUE).
    high = _submit(
        submit_dir,
        "--partition=high",
        f"--nodelist={node.group(1)}",
        "--exclusive",
        "--time=1",
        env=slurm_env(),
        script=high_script,
    )

    def requeued() -> bool:
        restarts = re.search(r"\bRestarts=(\d+)", _show(low))
        return restarts is not None and int(restarts.group(1)) >= 1

    _wait("the preempted job to be requeued", requeued, low)
    gate.touch()
    job = _finished(submit_dir, low)
    assert (job.returncode, job.state) == (0, "COMPLETED"), job.describe()
    assert re.search(r"\bRestarts=1\b", _show(low)), _show(low)
    assert _finished(submit_dir, high).state == "COMPLETED"
    # Same job id after the requeue, hence the same run dir, resumed; appended logs.
    assert f"=== mgpr job {low}" in job.out and "restart 1 ===" in job.out, job.describe()
    assert "resuming the run" in job.err, job.describe()
    keys, records, _ = _part_rows(run_dir)
    assert sorted(keys) == sorted(baseline["keys"]), "tiles lost or doubled by the requeue"
    assert records == baseline["records"]


def test_two_nodes_one_rank_each(submit_dir: Path, baseline: dict[str, Any]) -> None:
    if len(wait_for_nodes(2)) < 2:
        pytest.skip("the cluster has 1 node; start it with scripts/slurm/start.sh --nodes 2")
    # job.slurm asks for --gpus=1 by default: on N nodes give --gpus (or --gpus-per-node) too.
    job = sbatch_wait(
        JOB,
        "-N2",
        "--ntasks-per-node=1",
        "--gpus=2",
        cwd=submit_dir,
        env=_env(submit_dir),
        timeout=JOB_TIMEOUT,
        script_args=(
            "input_path=ortho.tif",
            "model=reference",
            "workers=0",
            "profiler=simple",
            *COMMON,
        ),
    )
    assert (job.returncode, job.state) == (0, "COMPLETED"), job.describe()
    run_dir = submit_dir / "runs" / f"slurm-{job.job_id}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"]) == (2, 2)
    # Both nodes' rank has local rank 0: Lightning alone named both profiles ...-profile-0.txt
    assert [Path(p).name for p in summary["profiles"]] == [
        "predict-simple-profile-node0-0.txt",
        "predict-simple-profile-node1-0.txt",
    ]
    parts = [json.loads(p.read_text()) for p in sorted((run_dir / "report_parts").glob("*.json"))]
    assert sorted((p["global_rank"], p["node_rank"]) for p in parts) == [(0, 0), (1, 1)]
    assert "(node rank 1 of 2, local rank 0)" in (run_dir / "logs" / "rank1.log").read_text()
    keys, records, _ = _part_rows(run_dir)
    assert sorted(keys) == sorted(baseline["keys"]) and records == baseline["records"]


def test_two_nodes_one_slower_still_finish_together(
    submit_dir: Path, baseline: dict[str, Any]
) -> None:
    """Node 2's rank is twice as slow per tile: the ranks still end together (chunks claimed
    from the store), the faster node does more tiles, and every tile is written once."""
    if len(wait_for_nodes(2)) < 2:
        pytest.skip("the cluster has 1 node; start it with scripts/slurm/start.sh --nodes 2")
    env = _env(submit_dir, MGPR_TEST_TILE_DELAY_RANK0="0.15", MGPR_TEST_TILE_DELAY_RANK1="0.3")
    job = sbatch_wait(
        JOB,
        "-N2",
        "--ntasks-per-node=1",
        "--gpus=2",
        cwd=submit_dir,
        env=env,
        timeout=JOB_TIMEOUT,
        script_args=(
            "input_path=ortho.tif",
            "model=reference",
            "workers=0",
            "batch_size=1",
            *COMMON,
        ),
    )
    assert (job.returncode, job.state) == (0, "COMPLETED"), job.describe()
    run_dir = submit_dir / "runs" / f"slurm-{job.job_id}"
    ranks = sorted(
        json.loads((run_dir / "report.json").read_text())["ranks"], key=lambda r: r["global_rank"]
    )
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["tiles"] > ranks[1]["tiles"], ranks  # the faster node claimed more
    walls = [r["wall_s"] for r in ranks]
    assert min(walls) / max(walls) >= 0.75, walls
    keys, records, _ = _part_rows(run_dir)
    assert sorted(keys) == sorted(baseline["keys"]) and records == baseline["records"]


def test_rank0_refuses_and_every_rank_is_told_at_once(
    submit_dir: Path, baseline: dict[str, Any]
) -> None:
    """Another run's results in output_dir: rank 0 refuses, rank 1 gets the same line at once.

    Before the ranks joined first, rank 1 checked ``run.json`` itself; now it only hears rank
    0's decision through the process group, so it fails with rank 0's line within seconds,
    however long ``join_timeout_s`` is.
    """
    other = submit_dir / "another-run"
    shutil.copytree(baseline["run_dir"], other)
    start = time.monotonic()
    job = sbatch_wait(
        JOB,
        "--ntasks-per-node=2",
        "--gpus=2",
        cwd=submit_dir,
        env=_env(submit_dir),
        script_args=(
            "input_path=ortho.tif",
            "model=reference",
            "workers=0",
            f"output_dir={other}",
            "join_timeout_s=600",
            "tile_size=256",  # another tiling: another run's fingerprint
            "overlap=32",
            "progress=false",
        ),
        timeout=JOB_TIMEOUT,
    )
    # srun --kill-on-bad-exit may TERM the second rank while it prints the same refusal, so the
    # job's code is 2, that rank's 130, or 143 when the TERM lands after mgpr's handler was
    # restored on the way out (seen on a loaded machine); every error line is rank 0's, none a
    # timeout.
    assert job.state == "FAILED" and job.returncode in (2, 130, 143), job.describe()
    lines = [line for line in job.err.splitlines() if line.startswith("mgpr: error: ")]
    assert len(lines) == 1, job.describe()  # rank 0's; rank 1 keeps it in its log alone
    assert "holds results of another run" in lines[0] and "overwrite=true" in lines[0]
    assert lines[0] in (other / "logs" / "rank1.log").read_text(), job.describe()
    assert "waited" not in job.err and "join_timeout_s" not in job.err, job.describe()
    assert time.monotonic() - start < 120, "a rank waited instead of being told"
    assert sorted(p.name for p in other.iterdir()) == sorted(
        p.name for p in baseline["run_dir"].iterdir()
    )  # nothing written or removed
