"""Helpers for tests that need a running SLURM cluster (``@pytest.mark.slurm``).

Start one with ``bash scripts/slurm/ci-setup.sh`` (root, Debian). The helpers find it through
``SLURM_CONF`` and, when that is unset, through ``${MGPR_SLURM_DIR:-/tmp/slurmci}/slurm.conf``.

    from slurm_helpers import require_slurm, sbatch_wait   # tests/ is on sys.path under pytest

    def test_x(tmp_path):
        require_slurm()                      # pytest.skip with a reason when no cluster answers
        job = sbatch_wait(script, "--ntasks-per-node=2", "--gpus=2", cwd=tmp_path)
        assert job.returncode == 0, job.describe()
        job.out                              # slurm_logs/<id>.out under cwd
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Job states after which a job does not run again (a requeued job goes back to PENDING instead).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


def slurm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` (no job variables) plus the local cluster's ``SLURM_CONF`` and ``extra``."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").exists():
        conf = Path(env.get("MGPR_SLURM_DIR", "/tmp/slurmci")) / "slurm.conf"
        if conf.exists():
            env["SLURM_CONF"] = str(conf)
    # A test run inside an allocation must not leak its job's variables into new jobs.
    for key in [
        k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"
    ]:
        del env[key]
    env.update(extra or {})
    return env


@functools.cache
def slurm_skip_reason() -> str | None:
    """Why SLURM tests cannot run here, or None when a cluster answers ``sinfo -h`` within 5 s."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch not on PATH); run `bash scripts/slurm/ci-setup.sh`"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%t"],
            env=slurm_env(),
            capture_output=True,
            text=True,
            timeout=5,
        )
    except subprocess.TimeoutExpired:
        return "no SLURM cluster answered `sinfo -h` within 5 s"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        return f"no SLURM cluster answers `sinfo -h` ({first}); start one: scripts/slurm/start.sh"
    if not any(s.strip().startswith(("idle", "mix", "alloc")) for s in proc.stdout.splitlines()):
        return f"SLURM answers but no node is up (states: {proc.stdout.split()})"
    return None


def require_slurm() -> None:
    """Skip the calling test (with the reason) unless a SLURM cluster answers."""
    reason = slurm_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def cluster_nodes(partition: str | None = None) -> list[str]:
    """Names of the nodes that are up (idle, mixed, allocated or completing), sorted.

    Completing counts: a node is ``comp`` for a moment after each job while slurmd cleans up
    (a two-node test once skipped so, just after another test's job), and a two-node job
    submitted then just waits for it.
    """
    cmd = ["sinfo", "-h", "-N", "-o", "%N %t"] + (["-p", partition] if partition else [])
    proc = subprocess.run(
        cmd, env=slurm_env(), capture_output=True, text=True, timeout=10, check=True
    )
    nodes = {
        line.split()[0]
        for line in proc.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].startswith(("idle", "mix", "alloc", "comp"))
    }
    return sorted(nodes)


def wait_for_nodes(count: int, timeout_s: float = 20.0) -> list[str]:
    """The up nodes once there are ``count`` of them, or those up after ``timeout_s``.

    Under the parallel suite a node was once seen in another state for a moment right after an
    earlier job (two two-node tests skipped in one clean-clone run while ``sinfo`` showed both
    nodes idle a minute later): look again for a while before skipping.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = cluster_nodes()
        if len(nodes) >= count or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """A finished batch job.

    Attributes:
        job_id: SLURM job id.
        returncode: the batch script's exit code (``ExitCode=rc:signal``'s rc; with a signal,
            128 + signal).
        state: final ``JobState`` (COMPLETED, FAILED, CANCELLED, TIMEOUT...).
        out_path: ``<cwd>/slurm_logs/<id>.out``.
        err_path: ``<cwd>/slurm_logs/<id>.err``.
    """

    job_id: str
    returncode: int
    state: str
    out_path: Path
    err_path: Path

    @property
    def out(self) -> str:
        """The job's stdout log ('' when absent)."""
        return self.out_path.read_text() if self.out_path.exists() else ""

    @property
    def err(self) -> str:
        """The job's stderr log ('' when absent)."""
        return self.err_path.read_text() if self.err_path.exists() else ""

    def describe(self) -> str:
        """One block for assertion messages: id, state, exit code and both logs."""
        return (
            f"job {self.job_id} {self.state} rc={self.returncode}\n"
            f"--- {self.out_path} ---\n{self.out}\n--- {self.err_path} ---\n{self.err}"
        )


def job_state(job_id: str, env: dict[str, str] | None = None) -> tuple[str, int | None]:
    """``(JobState, exit code or None)`` from ``scontrol show job`` (there is no sacct here)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        env=env or slurm_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )
    state = re.search(r"\bJobState=(\S+)", proc.stdout)
    code = re.search(r"\bExitCode=(\d+):(\d+)", proc.stdout)
    rc = None
    if code is not None:
        rc = int(code.group(1)) if int(code.group(2)) == 0 else 128 + int(code.group(2))
    return (state.group(1) if state else "UNKNOWN", rc)


def sbatch_wait(
    script: Path,
    *sbatch_args: str,
    cwd: Path,
    script_args: tuple[str, ...] = (),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    use_sbatch_wait: bool = False,
) -> SlurmJob:
    """Submit ``script`` from ``cwd`` and wait until the job has finished.

    Logs go to ``<cwd>/slurm_logs/<id>.out`` / ``.err`` (the directory is created; an
    ``--output``/``--error`` in ``sbatch_args`` is not supported). By default the job is
    submitted with ``sbatch --parsable`` and ``scontrol show job`` is polled every 0.2 s: about
    1-3 s per small job here, where ``sbatch --wait`` took 2-10 s (its own poll backs off).
    ``use_sbatch_wait=True`` uses ``sbatch --parsable --wait`` instead. On timeout the job is
    cancelled and the test fails with both logs.

    Args:
        script: batch script.
        *sbatch_args: sbatch options, e.g. ``"--ntasks-per-node=2", "--gpus=2"``.
        cwd: submit directory (``SLURM_SUBMIT_DIR``).
        script_args: arguments after the script (Hydra overrides for jobs/job.slurm).
        timeout: seconds from submit to the end of the job.
        env: environment for sbatch (default :func:`slurm_env`); the job inherits it.
        use_sbatch_wait: block in ``sbatch --wait`` instead of polling.
    """
    env = env if env is not None else slurm_env()
    (cwd / "slurm_logs").mkdir(exist_ok=True)
    cmd = [
        "sbatch",
        "--parsable",
        "--output=slurm_logs/%j.out",
        "--error=slurm_logs/%j.err",
        *(["--wait"] if use_sbatch_wait else []),
        *sbatch_args,
        str(script),
        *script_args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    deadline = time.monotonic() + timeout
    if not first:
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"sbatch refused the job (rc={proc.returncode}): {err.strip()}")
    job_id = first.split(";")[0]
    logs = (cwd / "slurm_logs" / f"{job_id}.out", cwd / "slurm_logs" / f"{job_id}.err")

    state, rc = "PENDING", None
    try:
        if use_sbatch_wait:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            state, rc = job_state(job_id, env)
            rc = proc.returncode if rc is None else rc
        else:
            proc.wait(timeout=30)
            while time.monotonic() < deadline:
                state, rc = job_state(job_id, env)
                if state in TERMINAL_STATES:
                    break
                time.sleep(0.2)
            else:
                raise subprocess.TimeoutExpired(cmd, timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id], env=env, timeout=10)
        proc.kill()
        job = SlurmJob(job_id, -1, state, *logs)
        pytest.fail(
            f"SLURM job did not finish within {timeout:.0f} s; cancelled.\n{job.describe()}"
        )
    return SlurmJob(job_id, rc if rc is not None else -1, state, *logs)
