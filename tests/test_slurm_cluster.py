"""Against a real (local) SLURM cluster: tasks, fake GPUs, several nodes, and jobs/job.slurm.

Skipped with a reason when no cluster answers; start one with ``bash scripts/slurm/ci-setup.sh``
(``--nodes 2`` for the multi-node test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from slurm_helpers import REPO, require_slurm, sbatch_wait, slurm_env, wait_for_nodes

pytestmark = pytest.mark.slurm

PRINT_TASK = """#!/bin/bash
#SBATCH --job-name=mgpr-test
#SBATCH --time=2
srun bash -c 'echo "task procid=$SLURM_PROCID localid=$SLURM_LOCALID nodeid=$SLURM_NODEID \
cvd=$CUDA_VISIBLE_DEVICES"'
"""


@pytest.fixture(autouse=True)
def _cluster() -> None:
    require_slurm()


def _tasks(out: str) -> list[dict[str, str]]:
    rows = []
    for line in out.splitlines():
        if line.startswith("task "):
            rows.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
    return sorted(rows, key=lambda r: int(r["procid"]))


def test_two_tasks_with_two_fake_gpus(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(PRINT_TASK)
    job = sbatch_wait(script, "--ntasks-per-node=2", "--gpus=2", cwd=tmp_path, timeout=60)
    assert job.returncode == 0 and job.state == "COMPLETED", job.describe()
    tasks = _tasks(job.out)
    assert [t["procid"] for t in tasks] == ["0", "1"], job.describe()
    assert [t["localid"] for t in tasks] == ["0", "1"]
    assert all(t["cvd"] == "0,1" for t in tasks), job.describe()


def test_two_nodes_one_task_each(tmp_path: Path) -> None:
    if len(wait_for_nodes(2)) < 2:
        pytest.skip("the cluster has 1 node; start it with scripts/slurm/start.sh --nodes 2")
    script = tmp_path / "job.sh"
    script.write_text(PRINT_TASK)
    job = sbatch_wait(script, "-N2", "--ntasks-per-node=1", cwd=tmp_path, timeout=60)
    assert job.returncode == 0, job.describe()
    tasks = _tasks(job.out)
    assert [(t["procid"], t["nodeid"], t["localid"]) for t in tasks] == [
        ("0", "0", "0"),
        ("1", "1", "0"),
    ], job.describe()


def test_exit_code_comes_back(tmp_path: Path) -> None:
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=1\necho about to fail\nexit 3\n")
    job = sbatch_wait(script, cwd=tmp_path, timeout=60)
    assert (job.returncode, job.state) == (3, "FAILED"), job.describe()
    assert "about to fail" in job.out


def test_read_slurm_task_in_a_real_step(tmp_path: Path) -> None:
    code = (
        "import dataclasses, json, os; from mgpr.run.slurm import read_slurm_task; "
        "t = read_slurm_task(os.environ); print('TASK', json.dumps(t and dataclasses.asdict(t)))"
    )
    script = tmp_path / "py.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=mgpr\n#SBATCH --time=2\n"
        f"cd {REPO}\n"
        f"{sys.executable} -c {json.dumps(code)}\n"  # the batch shell: not a task
        f"srun {sys.executable} -c {json.dumps(code)}\n"
    )
    job = sbatch_wait(
        script, "--ntasks-per-node=2", "--gpus=2", "--cpus-per-task=2", cwd=tmp_path, timeout=90
    )
    assert job.returncode == 0, job.describe()
    seen = [json.loads(line[5:]) for line in job.out.splitlines() if line.startswith("TASK ")]
    assert len(seen) == 3 and seen.count(None) == 1, job.describe()
    tasks = sorted((t for t in seen if t is not None), key=lambda t: t["procid"])
    for rank, t in enumerate(tasks):
        assert t == {
            "job_id": job.job_id,
            "ntasks": 2,
            "ntasks_per_node": 2,
            "nnodes": 1,
            "procid": rank,
            "localid": rank,
            "nodeid": 0,
            "cpus_per_task": 2,
            "gpus_on_node": 2,
            "cuda_visible_devices": "0,1",
            "job_name": "mgpr",
            "step_id": "0",  # the script's first srun
        }


def test_job_template_under_sbatch(tmp_path: Path) -> None:
    # jobs/job.slurm with a stand-in for mgpr: the demo's flags, overrides passed through,
    # defaults added, one srun task per GPU, logs in slurm_logs/ of the submit dir.
    fake = tmp_path / "fake-mgpr"
    fake.write_text(
        '#!/bin/bash\n[[ $1 == --slurm-preflight ]] && { echo "preflight $*"; exit 0; }\n'
        'echo "rank=$SLURM_PROCID cvd=$CUDA_VISIBLE_DEVICES cpt=$SLURM_CPUS_PER_TASK args=$*"\n'
    )
    fake.chmod(0o755)
    job = sbatch_wait(
        REPO / "jobs" / "job.slurm",
        "--ntasks-per-node=2",
        "--gpus=2",
        "--time=2",
        cwd=tmp_path,
        script_args=("input_path=/data/o.tif", "model=fasterrcnn"),
        env=slurm_env({"MGPR_BIN": str(fake)}),
        timeout=60,
    )
    assert job.returncode == 0, job.describe()
    assert f"=== mgpr job {job.job_id}" in job.out
    ranks = sorted(line for line in job.out.splitlines() if line.startswith("rank="))
    expected_args = (
        f"input_path=/data/o.tif model=fasterrcnn output_dir=runs/slurm-{job.job_id} "
        "workers=3 progress=false"
    )
    assert ranks == [
        f"rank=0 cvd=0,1 cpt=4 args={expected_args}",
        f"rank=1 cvd=0,1 cpt=4 args={expected_args}",
    ], job.describe()
    # The batch shell checked the config against the allocation once, before srun.
    assert f"preflight --slurm-preflight {expected_args}" in job.out.splitlines(), job.describe()
